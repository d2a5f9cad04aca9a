"""torch.onnx (dynamo exporter) for one graph, then the checks every graph must pass.

The dynamo exporter handles the wrappers as written (varargs caches, dynamic batch, token and
past dimensions), so the TorchScript exporter is not used. Graphs are written with IR version
10: onnx 1.23 defaults to a newer IR that ONNX Runtime 1.2x and TensorRT's parser reject.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

from dspark_export.export.wrappers import GraphSpec

IR_VERSION = 10
# Protobuf cannot serialise a message over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

_ONNX_TYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
}


def export_graph(spec: GraphSpec, path: Path, opset: int) -> None:
    """Trace `spec.module` and write a checked ONNX file at `path`.

    Dynamic dimensions keep the names of the wrappers' `torch.export.Dim`s (`batch`, `past`...).
    """
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            spec.module.eval(),
            spec.example_inputs,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=spec.dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    # Saved straight from the exporter's IR (no intermediate ModelProto copy of the weights):
    # this keeps peak memory near the model's own size plus one serialised copy.
    program.model.ir_version = IR_VERSION
    weight_bytes = sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
                       if v.const_value is not None)
    program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_THRESHOLD)
    del program
    check_model(path)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Inline weights when they fit in one protobuf, external data beside the file otherwise."""
    external = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
    )


def check_model(path: Path) -> None:
    """onnx.checker and strict shape inference on the written file (by path: >2 GiB safe)."""
    onnx.checker.check_model(str(path), full_check=True)


def describe_io(path: Path) -> dict:
    """Inputs and outputs of a graph: name, dtype and dims (ints or symbolic names)."""
    model = onnx.load(str(path), load_external_data=False)

    def values(items):
        out = []
        for v in items:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": _ONNX_TYPES.get(t.elem_type, str(t.elem_type)), "shape": dims})
        return out

    return {"inputs": values(model.graph.input), "outputs": values(model.graph.output)}

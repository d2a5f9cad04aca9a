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
    # Weights go to `<name>.onnx.data` straight from the exporter's IR: serialising them into
    # one protobuf would hold two extra copies of every weight in memory (about 5x the weights
    # at peak instead of about 1.5x), and protobuf cannot hold more than 2 GiB anyway.
    program.model.ir_version = IR_VERSION
    program.save(str(path), external_data=True)
    del program
    check_model(path)


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

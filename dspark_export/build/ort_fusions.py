"""ONNX Runtime contrib-op fusions for the target graph of CPU bundles.

The exported target is standard ONNX, the graph TensorRT parses too: every RMSNorm is seven
element-wise nodes and every rotary embedding seven more, about 2,000 nodes in all for the
reference target. On a CPU, where a decode step runs each node on tiny tensors, a node costs
its dispatch as much as its arithmetic, so a CPU bundle's target gets ONNX Runtime's fused
kernels instead, rewritten by onnxscript's pattern rewriter before ORT's own offline fusions:

- RMSNorm -> `SimplifiedLayerNormalization`, and a residual Add feeding one ->
  `com.microsoft.SkipSimplifiedLayerNormalization` (onnxscript's rules);
- `x * cos + rotate_half(x) * sin`, with cos/sin computed from `position_ids` ->
  `com.microsoft.RotaryEmbedding` reading cos/sin tables of `max_positions` rows (ours: the
  exporter computes the angles as a broadcast Mul, which onnxscript's cos/sin rule does not
  match);
- MatMuls that read the same input with constant weights (q, k and v; gate and up) -> one
  MatMul over the weights side by side and a Split: one pass over the input instead of three.

Each fused kernel works row by row, so a row's logits do not depend on how many tokens or rows
run beside it: the verify pass and a decode step still round alike (tests/test_ort_fusions.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import optimizer
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions import rms_normalization, rotary_embedding, skip_normalization

_FUSION_DOMAIN = "ai.onnxruntime._fusion"  # onnxscript's intermediate ops, inlined if unfused


class _RotaryFromPositions(pattern.RewriteRuleClassBase):
    """onnxscript's intermediate RotaryEmbedding(x, cos, sin) whose cos/sin are
    cos/sin(Concat(f, f)) of f = float(position_ids[..., None]) * inv_freq ->
    com.microsoft.RotaryEmbedding(x, position_ids, cos table, sin table)."""

    def __init__(self, max_positions: int) -> None:
        super().__init__("RotaryFromPositions", remove_nodes=False)
        self.max_positions = max_positions
        self._tables: dict[bytes, tuple[ir.Value, ir.Value]] = {}

    def pattern(self, op, x, position_ids, last_axis, inv_freq, head_axis):
        angles = op.Mul(op.Cast(op.Unsqueeze(position_ids, last_axis), to=ir.DataType.FLOAT),
                        inv_freq)
        both = op.Concat(angles, angles, axis=-1)
        return op.RotaryEmbedding(x, op.Unsqueeze(op.Cos(both), head_axis),
                                  op.Unsqueeze(op.Sin(both), head_axis),
                                  _domain=_FUSION_DOMAIN, _allow_other_attributes=True)

    def check(self, context, x, position_ids, last_axis, inv_freq, head_axis, **_
              ) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if inv_freq.const_value is None:
            return result.fail("inv_freq is not a constant", inv_freq)
        if position_ids.shape is None or len(position_ids.shape) != 2:
            return result.fail("position_ids is not [B, T]", position_ids)
        if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[3], int):
            return result.fail("x is not [B, H, T, D] with a known D", x)
        if inv_freq.const_value.numpy().size * 2 != x.shape[3]:
            return result.fail("the rotation does not cover the whole head", x)
        for value, want in ((last_axis, (-1, 2)), (head_axis, (1,))):
            axes = value.const_value
            if axes is None or axes.numpy().reshape(-1).tolist() not in [[a] for a in want]:
                return result.fail("unexpected unsqueeze axes", value)
        return result

    def rewrite(self, op, x, position_ids, inv_freq, **_):
        frequencies = inv_freq.const_value.numpy().astype(np.float32).reshape(-1)
        key = frequencies.tobytes()
        if key not in self._tables:
            angles = np.arange(self.max_positions, dtype=np.float32)[:, None] * frequencies
            n = len(self._tables)
            self._tables[key] = (
                op.initializer(ir.tensor(np.cos(angles), name=f"rotary_cos_table_{n}")),
                op.initializer(ir.tensor(np.sin(angles), name=f"rotary_sin_table_{n}")))
        cos, sin = self._tables[key]
        return op.RotaryEmbedding(x, position_ids, cos, sin, interleaved=0,
                                  _domain="com.microsoft")


def pack_shared_input_matmuls(model: ir.Model) -> int:
    """Every group of MatMuls reading one input with constant [K, N] weights becomes one
    MatMul over the weights concatenated along N, split back into the group's outputs.
    Returns the MatMuls packed."""
    graph, packed = model.graph, 0
    for value in _values(graph):
        group = [use.node for use in value.uses()
                 if use.node.op_type == "MatMul" and use.node.domain == "" and use.idx == 0
                 and _constant_matrix(use.node.inputs[1]) is not None
                 and use.node.graph is graph and not use.node.outputs[0].is_graph_output()]
        if len(group) < 2:
            continue
        weights = [_constant_matrix(node.inputs[1]) for node in group]
        if len({w.shape[0] for w in weights}) != 1 or len({w.dtype for w in weights}) != 1:
            continue
        name = group[0].name or "matmul"
        packed_weight = ir.Value(name=f"{name}_packed_weight",
                                 const_value=ir.tensor(np.concatenate(weights, axis=1)))
        graph.register_initializer(packed_weight)
        first = min(group, key=graph.index)
        matmul = ir.Node("", "MatMul", [value, packed_weight], name=f"{name}_packed")
        sizes = ir.Value(name=f"{name}_packed_sizes", const_value=ir.tensor(
            np.array([w.shape[1] for w in weights], dtype=np.int64)))
        graph.register_initializer(sizes)
        split = ir.Node("", "Split", [matmul.outputs[0], sizes], num_outputs=len(group),
                        attributes=[ir.AttrInt64("axis", -1)], name=f"{name}_packed_split")
        graph.insert_before(first, [matmul, split])
        for node, out in zip(group, split.outputs):
            node.outputs[0].replace_all_uses_with(out)
            graph.remove(node, safe=True)
        packed += len(group)
    return packed


def _values(graph: ir.Graph) -> list[ir.Value]:
    """Every value a node of `graph` can read: inputs, then node outputs, in order."""
    return list(graph.inputs) + [out for node in graph for out in node.outputs]


def _constant_matrix(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or len(value.const_value.shape) != 2:
        return None
    return value.const_value.numpy()


def fuse_for_cpu(src: Path, dst: Path, *, max_positions: int) -> dict[str, int]:
    """Rewrite `src` (a target graph) into `dst` (weights in `<dst>.data`); fusions by kind.
    `max_positions`: rows of the rotary tables, more than any position the bundle runs."""
    model = ir.load(src)
    common_passes.ShapeInferencePass()(model)
    counts = {
        "SimplifiedLayerNormalization": rms_normalization.fuse_rms_normalization(model),
        "SkipSimplifiedLayerNormalization": skip_normalization.fuse_skip_rms_normalization(model),
    }
    rotary_embedding.fuse_rotary_embedding(model)  # intermediate ops, made concrete below
    rotary = pattern.RewriteRuleSet([_RotaryFromPositions.rule(max_positions)])
    counts["RotaryEmbedding"] = rotary.apply_to_model(model)
    counts["packed MatMul"] = pack_shared_input_matmuls(model)
    optimizer.optimize(model)  # inlines what stayed intermediate, drops the dead cos/sin nodes
    ir.save(model, dst, external_data=f"{dst.name}.data")
    return counts

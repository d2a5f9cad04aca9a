"""SpecVerify as an ONNX function: one `dspark::SpecVerify` node whose body is standard ops.

ONNX Runtime (any provider, no custom-op library) inlines the body; a TensorRT build calls
`strip_function` so the parser finds no local function and maps the node onto the plugin
registered by `tensorrt_plugin.py`. The body is the single graph-level definition of the op:
greedy and sampling rows are computed side by side and chosen with Where on temperature > 0.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, helper

from .reference import RESIDUAL_EPS

DOMAIN = "dspark"
OP_TYPE = "SpecVerify"
DOMAIN_VERSION = 1
INPUTS = ("target_logits", "draft_ids", "draft_probs", "verify_lengths", "temperature", "uniforms")
OUTPUTS = ("accepted", "tokens")

_LOGITS_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
                 "bfloat16": TensorProto.BFLOAT16}

__all__ = ["DOMAIN", "DOMAIN_VERSION", "INPUTS", "OP_TYPE", "OUTPUTS", "make_function",
           "make_verify_model", "strip_function"]


class _Body:
    """Collects function-body nodes; each call returns the name of the new node's output."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = f"{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype=np.int64) -> str:
        tensor = helper.make_tensor("value", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                    np.shape(value), np.asarray(value, dtype=dtype).ravel())
        return self.op("Constant", value=tensor)


def _body_nodes() -> tuple[list[onnx.NodeProto], str, str]:
    """Build the body; return (nodes, accepted output name, tokens output name)."""
    f = _Body()
    logits, draft_ids, draft_probs, lengths, temperature, uniforms = INPUTS
    zero_f, one_f = f.const(0.0, np.float32), f.const(1.0, np.float32)
    zero, one, axis1, axis2 = f.const([0]), f.const([1]), f.const([1]), f.const([2])
    zero_s, one_s = f.const(0), f.const(1)

    # Target distributions. Greedy rows divide by 1 instead of T <= 0, so no NaN/inf appears.
    x = f.op("Cast", logits, to=TensorProto.FLOAT)
    sampling = f.op("Greater", temperature, zero_f)                                  # [B]
    t_safe = f.op("Where", sampling, temperature, one_f)
    p = f.op("Softmax", f.op("Div", x, f.op("Unsqueeze", t_safe, f.const([1, 2]))), axis=-1)
    argmax = f.op("ArgMax", x, axis=2, keepdims=0, select_last_index=0)              # [B, G+1]

    g = f.op("Shape", draft_ids, start=1, end=2)                                    # [1] = G
    g_s = f.op("Squeeze", g)
    ids3 = f.op("Unsqueeze", draft_ids, axis2)                                      # [B, G, 1]

    # Acceptance test per draft position, then the leading run of accepted drafts.
    p_x = f.op("Squeeze", f.op("GatherElements", f.op("Slice", p, zero, g, axis1), ids3, axis=2), axis2)
    q_x = f.op("Squeeze", f.op("GatherElements", draft_probs, ids3, axis=2), axis2)
    u_x = f.op("Slice", uniforms, zero, g, axis1)
    accept_sampling = f.op("Less", f.op("Mul", u_x, q_x), p_x)
    accept_greedy = f.op("Equal", draft_ids, f.op("Slice", argmax, zero, g, axis1))
    sampling2 = f.op("Unsqueeze", sampling, axis1)                                  # [B, 1]
    lengths2 = f.op("Unsqueeze", lengths, axis1)                                    # [B, 1]
    in_length = f.op("Less", f.op("Range", zero_s, g_s, one_s), lengths2)
    # Where has no bool kernel in ONNX Runtime, so pick the per-row test with And/Or.
    accept = f.op("Or", f.op("And", sampling2, accept_sampling),
                  f.op("And", f.op("Not", sampling2), accept_greedy))
    ok = f.op("And", accept, in_length)
    zeros_col = f.op("Sub", lengths2, lengths2)                                     # [B, 1] of 0
    # The first False of [ok, False] is the accepted count (ArgMin keeps the first index).
    ok_padded = f.op("Concat", f.op("Cast", ok, to=TensorProto.FLOAT),
                     f.op("Cast", zeros_col, to=TensorProto.FLOAT), axis=1)
    a = f.op("ArgMin", ok_padded, axis=1, keepdims=1, select_last_index=0)          # [B, 1]

    # Distribution to sample at position a: residual after a rejection, else p (bonus).
    a3 = f.op("Unsqueeze", a, axis2)                                                # [B, 1, 1]
    row_shape = f.op("Concat", f.op("Shape", p, start=0, end=1), one,
                     f.op("Shape", p, start=2, end=3), axis=0)                      # [B, 1, V]
    p_a = f.op("GatherElements", p, f.op("Expand", a3, row_shape), axis=1)
    a_q = f.op("Min", a3, f.op("Sub", g, one))                                      # a == G has no q row
    q_a = f.op("GatherElements", draft_probs, f.op("Expand", a_q, row_shape), axis=1)
    residual = f.op("Max", f.op("Sub", p_a, q_a), zero_f)
    has_mass = f.op("Greater", f.op("ReduceSum", residual, axis2, keepdims=1),
                    f.const(RESIDUAL_EPS, np.float32))
    rejected = f.op("Unsqueeze", f.op("Less", a, lengths2), axis2)                  # [B, 1, 1]
    weights = f.op("Where", f.op("And", rejected, has_mass), residual, p_a)

    # Inverse CDF (docs/graphs.md): count(cumsum(w) <= u * sum), clamped to V - 1.
    cdf = f.op("CumSum", weights, f.const(2))
    total = f.op("Slice", cdf, f.const([-1]), f.const([np.iinfo(np.int64).max]), axis2)
    u_final = f.op("Unsqueeze", f.op("Gather", uniforms, g, axis=1), axis2)        # [B, 1, 1]
    below = f.op("Cast", f.op("LessOrEqual", cdf, f.op("Mul", u_final, total)), to=TensorProto.INT64)
    v_last = f.op("Sub", f.op("Shape", p, start=2, end=3), one)
    sampled = f.op("Min", f.op("ReduceSum", below, axis2, keepdims=0), v_last)      # [B, 1]
    token = f.op("Where", sampling2, sampled, f.op("GatherElements", argmax, a, axis=1))

    # tokens[b] = drafts[:a], token, then -1.
    minus_col = f.op("Sub", zeros_col, one)
    drafts_padded = f.op("Concat", draft_ids, minus_col, axis=1)                    # [B, G+1]
    slots = f.op("Range", zero_s, f.op("Add", g_s, one_s), one_s)                   # [G+1]
    tail = f.op("Where", f.op("Equal", slots, a), token, minus_col)
    f.nodes.append(helper.make_node("Where", [f.op("Less", slots, a), drafts_padded, tail],
                                    [OUTPUTS[1]]))
    f.nodes.append(helper.make_node("Squeeze", [a, axis1], [OUTPUTS[0]]))
    return f.nodes, OUTPUTS[0], OUTPUTS[1]


def make_function(opset: int = 18) -> onnx.FunctionProto:
    """The `dspark::SpecVerify` FunctionProto (standard ops of `opset`, which must be >= 18)."""
    if opset < 18:
        raise ValueError(f"SpecVerify's body needs opset >= 18, got {opset}")
    nodes, _, _ = _body_nodes()
    return helper.make_function(DOMAIN, OP_TYPE, list(INPUTS), list(OUTPUTS), nodes,
                                [helper.make_opsetid("", opset)], attributes=[],
                                doc_string="Lossless speculative verification; see "
                                           "plugins/spec_verify/spec.md.")


def make_verify_model(opset: int = 18, ir_version: int = 10,
                      logits_dtype: str | np.dtype | type = "float32") -> onnx.ModelProto:
    """`verify.onnx`: one SpecVerify node with symbolic dims B, G, G_plus_1, V.

    IR version 10 because onnx 1.23 writes 12+ by default, which ONNX Runtime 1.31 rejects.
    """
    name = np.dtype(logits_dtype).name if not isinstance(logits_dtype, str) else logits_dtype
    if name not in _LOGITS_TYPES:
        raise ValueError(f"logits_dtype must be one of {sorted(_LOGITS_TYPES)}, got {name!r}")
    inputs = [
        helper.make_tensor_value_info(INPUTS[0], _LOGITS_TYPES[name], ["B", "G_plus_1", "V"]),
        helper.make_tensor_value_info(INPUTS[1], TensorProto.INT64, ["B", "G"]),
        helper.make_tensor_value_info(INPUTS[2], TensorProto.FLOAT, ["B", "G", "V"]),
        helper.make_tensor_value_info(INPUTS[3], TensorProto.INT64, ["B"]),
        helper.make_tensor_value_info(INPUTS[4], TensorProto.FLOAT, ["B"]),
        helper.make_tensor_value_info(INPUTS[5], TensorProto.FLOAT, ["B", "G_plus_1"]),
    ]
    outputs = [helper.make_tensor_value_info(OUTPUTS[0], TensorProto.INT64, ["B"]),
               helper.make_tensor_value_info(OUTPUTS[1], TensorProto.INT64, ["B", "G_plus_1"])]
    node = helper.make_node(OP_TYPE, list(INPUTS), list(OUTPUTS), name="spec_verify", domain=DOMAIN)
    graph = helper.make_graph([node], "spec_verify", inputs, outputs)
    model = helper.make_model(
        graph, ir_version=ir_version, functions=[make_function(opset)],
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        producer_name="dspark-export")
    return model


def strip_function(model: onnx.ModelProto, aot: bool = True) -> onnx.ModelProto:
    """Copy of `model` without the SpecVerify function, its nodes tagged for TensorRT's parser.

    TensorRT's ONNX parser imports a model-local function before it looks for a plugin, so the
    body must go. Its fallback plugin importer looks the op type up under the node's string
    attribute `plugin_namespace` (else the empty namespace), and the int attribute `aot` = 1
    asks for the plugin's ahead-of-time implementation (a kernel baked into the engine, so it
    runs without Python). These are the only attributes the node ever carries.
    """
    stripped = copy.deepcopy(model)
    kept = [fn for fn in stripped.functions if (fn.domain, fn.name) != (DOMAIN, OP_TYPE)]
    del stripped.functions[:]
    stripped.functions.extend(kept)
    for node in stripped.graph.node:
        if node.domain == DOMAIN and node.op_type == OP_TYPE:
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("plugin_namespace", DOMAIN))
            if aot:
                node.attribute.append(helper.make_attribute("aot", 1))
    return stripped

"""Flat-signature modules, one per graph, in the I/O order of docs/graphs.md.

torch.onnx names graph inputs and outputs positionally, so each wrapper owns its names and its
dynamic dimensions next to the forward that defines them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim

from dspark_export.models.target import TargetAdapter


def kv_names(prefix: str, layers: int) -> list[str]:
    """`{prefix}_key_0, {prefix}_value_0, ...` interleaved per layer."""
    return [f"{prefix}_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


@dataclass
class GraphSpec:
    """What torch.onnx needs to export one wrapper: example inputs, names, dynamic dims."""

    module: nn.Module
    example_inputs: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple


class TargetGraph(nn.Module):
    """`target.onnx`: prefill and verify in one graph."""

    def __init__(self, adapter: TargetAdapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, input_ids, position_ids, past_lengths, new_lengths, *past_kv):
        logits, features, keys, values = self.adapter(
            input_ids, position_ids, past_lengths, new_lengths, list(past_kv[0::2]), list(past_kv[1::2])
        )
        present = [t for kv in zip(keys, values) for t in kv]
        return (logits, features, *present)


class DraftGraph(nn.Module):
    """`draft.onnx`: the parallel backbone with its context cache."""

    def __init__(self, drafter: nn.Module):
        super().__init__()
        self.drafter = drafter

    def forward(self, block_ids, block_positions, context_features, context_positions,
                context_lengths, past_lengths, *past_kv):
        hidden, logits, keys, values = self.drafter.backbone(
            block_ids, block_positions, context_features, context_positions, context_lengths,
            past_lengths, list(past_kv[0::2]), list(past_kv[1::2]),
        )
        present = [t for kv in zip(keys, values) for t in kv]
        return (hidden, logits, *present)


class MarkovGraph(nn.Module):
    """`markov.onnx`: the sequential stage, unrolled over the block."""

    def __init__(self, drafter: nn.Module):
        super().__init__()
        self.drafter = drafter

    def forward(self, base_logits, hidden_states, anchor_ids, temperature, uniforms):
        return self.drafter.markov_sample(base_logits, hidden_states, anchor_ids, temperature, uniforms)


def target_spec(adapter: TargetAdapter, dtype: torch.dtype) -> GraphSpec:
    s = adapter.shapes
    batch, tokens, past = 2, 3, 5
    ids = torch.randint(0, s.vocab_size, (batch, tokens))
    positions = torch.arange(tokens)[None].repeat(batch, 1) + past
    kv = [torch.randn(batch, s.num_kv_heads, past, s.head_dim, dtype=dtype) for _ in range(2 * s.num_layers)]
    inputs = (ids, positions, torch.tensor([past, past - 1]), torch.tensor([tokens, tokens - 1]), *kv)
    b, t, p = Dim("batch"), Dim("new_tokens"), Dim("past")
    names = ["input_ids", "position_ids", "past_lengths", "new_lengths"] + kv_names("past", s.num_layers)
    outputs = ["logits", "features"] + kv_names("present", s.num_layers)
    dims = {"input_ids": {0: b, 1: t}, "position_ids": {0: b, 1: t}, "past_lengths": {0: b},
            "new_lengths": {0: b}, **{n: {0: b, 2: p} for n in names[4:]}}
    dynamic = (*[dims[n] for n in names[:4]], tuple(dims[n] for n in names[4:]))
    return GraphSpec(TargetGraph(adapter), inputs, names, outputs, dynamic)


def draft_spec(drafter: nn.Module, dtype: torch.dtype) -> GraphSpec:
    c = drafter.config
    gamma, layers, kv_heads, head_dim = c.block_size, c.num_layers, c.num_kv_heads, c.head_dim
    feature_dim = c.feature_size
    batch, ctx, past = 2, 4, 5
    anchor_pos = torch.tensor([past + ctx, past + ctx - 1])
    block_ids = torch.full((batch, gamma), c.mask_token_id)
    block_ids[:, 0] = 3
    inputs = (
        block_ids,
        anchor_pos[:, None] + torch.arange(gamma)[None],
        torch.randn(batch, ctx, feature_dim, dtype=dtype),
        torch.arange(ctx)[None].repeat(batch, 1) + past,
        torch.tensor([ctx, ctx - 1]),
        torch.tensor([past, past]),
        *[torch.randn(batch, kv_heads, past, head_dim, dtype=dtype) for _ in range(2 * layers)],
    )
    b, n, p = Dim("batch"), Dim("context"), Dim("past")
    names = ["block_ids", "block_positions", "context_features", "context_positions",
             "context_lengths", "past_lengths"] + kv_names("past", layers)
    outputs = ["hidden_states", "base_logits"] + kv_names("present", layers)
    dims = {"block_ids": {0: b}, "block_positions": {0: b}, "context_features": {0: b, 1: n},
            "context_positions": {0: b, 1: n}, "context_lengths": {0: b}, "past_lengths": {0: b},
            **{name: {0: b, 2: p} for name in names[6:]}}
    dynamic = (*[dims[x] for x in names[:6]], tuple(dims[x] for x in names[6:]))
    return GraphSpec(DraftGraph(drafter), inputs, names, outputs, dynamic)


def markov_spec(drafter: nn.Module, dtype: torch.dtype) -> GraphSpec:
    c = drafter.config
    gamma, hidden = c.block_size, c.hidden_size
    vocab = c.vocab_size if drafter.draft_vocab is None else drafter.draft_vocab.numel()
    batch = 2
    inputs = (
        torch.randn(batch, gamma, vocab),
        torch.randn(batch, gamma, hidden, dtype=dtype),
        torch.tensor([3, 4]),
        torch.tensor([0.0, 1.0]),
        torch.rand(batch, gamma),
    )
    b = Dim("batch")
    names = ["base_logits", "hidden_states", "anchor_ids", "temperature", "uniforms"]
    outputs = ["draft_ids", "draft_probs", "confidence_logits"]
    dims = {name: {0: b} for name in names}
    dynamic = tuple(dims[x] for x in names)
    return GraphSpec(MarkovGraph(drafter), inputs, names, outputs, dynamic)

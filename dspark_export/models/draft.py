"""The DSpark (and DFlash) drafter in PyTorch, reading and writing DeepSpec checkpoints as they are.

DeepSpec saves its `Qwen3DSparkModel` with `save_pretrained`: a `config.json` that is the
target's config plus DSpark fields, and safetensors whose names we keep verbatim
(`layers.N.self_attn.q_proj.weight`, `fc.weight`, `markov_head.markov_w1.weight`, ...).
The module here has the same parameter tree, but its inference methods take and return plain
tensors (no Hugging Face Cache objects, no data-dependent Python branches), so torch.onnx can
trace them into the `draft` and `markov` graphs of docs/graphs.md.
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig, Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3MLP,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
)

from dspark_export.models.target import TargetError, apply_rope
from dspark_export.models.target import check_target_layer_ids as target_layer_ids_rule
from dspark_export.models.markov import (
    MARKOV_HEAD_TYPES,
    NO_CONFIDENCE_LOGIT,
    ConfidenceHead,
    build_markov_head,
    select_token,
)

ARCHITECTURE = "Qwen3DSparkModel"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# The target's frozen embeddings and lm_head: optional in a checkpoint, taken from the target.
TARGET_TENSORS = ("embed_tokens.weight", "lm_head.weight")
# Fields DeepSpec's model asserts on, plus the sizes every tensor shape derives from.
REQUIRED_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
    "vocab_size",
    "num_target_layers",
    "block_size",
    "target_layer_ids",
    "mask_token_id",
    "num_anchors",
    "enable_confidence_head",
    "markov_rank",
)
DEFAULT_MARKOV_RANK = 64
DEFAULT_NUM_ANCHORS = 512  # DeepSpec's training default; only recorded, never used here.
INIT_STD = 0.02


class DraftError(ValueError):
    """A drafter folder, config or target pairing the toolchain cannot use."""


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DSparkConfig:
    """A drafter `config.json`: the raw dict (saved back verbatim) and its Qwen3 reading.

    `hf` is the `Qwen3Config` DeepSpec's `from_pretrained` would build from the same dict, so
    defaults for absent fields (head_dim, rms_norm_eps, rope) match DeepSpec exactly.
    """

    raw: dict[str, Any]
    source: str
    hf: Qwen3Config = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<config dict>") -> DSparkConfig:
        try:  # a JSON round trip copies the dict and makes saving reproduce it exactly
            raw = json.loads(json.dumps(raw))
        except (TypeError, ValueError) as exc:
            raise DraftError(f"{source}: config is not JSON-serialisable: {exc}") from exc
        _check_fields(raw, source)
        try:
            hf = Qwen3Config.from_dict(copy.deepcopy(raw))
        except Exception as exc:  # strict dataclass errors name the field
            raise DraftError(f"{source}: invalid Qwen3 config field: {exc}") from exc
        _check_layer_types(hf, source)
        return cls(raw=raw, source=source, hf=hf)

    @classmethod
    def from_file(cls, path: Path | str) -> DSparkConfig:
        path = Path(path)
        if not path.is_file():
            raise DraftError(f"{path}: drafter config not found")
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DraftError(f"{path}: cannot read drafter config: {exc}") from exc
        if not isinstance(raw, dict):
            raise DraftError(f"{path}: drafter config must be a JSON object")
        return cls.from_dict(raw, str(path))

    @property
    def hidden_size(self) -> int:
        return int(self.hf.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.hf.vocab_size)

    @property
    def num_layers(self) -> int:
        """Draft decoder layers (DeepSpec stores them as num_hidden_layers)."""
        return int(self.hf.num_hidden_layers)

    @property
    def num_target_layers(self) -> int:
        return int(self.raw["num_target_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.hf.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(self.hf.num_key_value_heads)

    @property
    def head_dim(self) -> int:
        return int(self.hf.head_dim)

    @property
    def block_size(self) -> int:
        return int(self.raw["block_size"])

    @property
    def target_layer_ids(self) -> list[int]:
        return [int(i) for i in self.raw["target_layer_ids"]]

    @property
    def feature_size(self) -> int:
        """F: width of the concatenated target features that `fc` projects."""
        return len(self.target_layer_ids) * self.hidden_size

    @property
    def mask_token_id(self) -> int:
        return int(self.raw["mask_token_id"])

    @property
    def markov_rank(self) -> int:
        return int(self.raw["markov_rank"])

    @property
    def markov_head_type(self) -> str | None:
        """vanilla | gated | rnn, or None for a DFlash drafter (markov_rank == 0)."""
        if self.markov_rank == 0:
            return None
        return str(self.raw["markov_head_type"]).lower()

    @property
    def enable_confidence_head(self) -> bool:
        return bool(self.raw["enable_confidence_head"])

    @property
    def confidence_head_with_markov(self) -> bool:
        return self.enable_confidence_head and bool(self.raw["confidence_head_with_markov"])


def _check_fields(raw: dict[str, Any], source: str) -> None:
    """DeepSpec's config rules, raised as DraftError naming the field and the file."""
    architectures = raw.get("architectures")
    if not isinstance(architectures, list) or ARCHITECTURE not in architectures:
        raise DraftError(
            f"{source}: architectures is {architectures!r}; only DeepSpec's "
            f"[{ARCHITECTURE!r}] drafter (DSpark or DFlash) is supported"
        )
    missing = [name for name in REQUIRED_FIELDS if name not in raw]
    if missing:
        raise DraftError(f"{source}: missing required field(s) {', '.join(missing)}")
    for name in ("num_hidden_layers", "num_target_layers", "block_size", "vocab_size"):
        if _int_field(raw, name, source) < 1:
            raise DraftError(f"{source}: {name} must be >= 1, got {raw[name]}")
    markov_rank = _int_field(raw, "markov_rank", source)
    if markov_rank < 0:
        raise DraftError(f"{source}: markov_rank must be >= 0, got {markov_rank}")
    if markov_rank > 0:
        head_type = raw.get("markov_head_type")
        if head_type is None:
            raise DraftError(f"{source}: markov_head_type is required when markov_rank > 0")
        if str(head_type).lower() not in MARKOV_HEAD_TYPES:
            raise DraftError(
                f"{source}: markov_head_type {head_type!r} is not one of "
                f"{', '.join(MARKOV_HEAD_TYPES)}"
            )
    if bool(raw["enable_confidence_head"]):
        if "confidence_head_with_markov" not in raw:
            raise DraftError(
                f"{source}: confidence_head_with_markov is required when "
                "enable_confidence_head is true"
            )
        if bool(raw["confidence_head_with_markov"]) and markov_rank == 0:
            raise DraftError(
                f"{source}: confidence_head_with_markov needs a Markov head, but markov_rank is 0"
            )
    check_target_layer_ids(raw["target_layer_ids"], raw["num_target_layers"], source)
    mask_token_id = _int_field(raw, "mask_token_id", source)
    if not 0 <= mask_token_id < int(raw["vocab_size"]):
        raise DraftError(
            f"{source}: mask_token_id {mask_token_id} is outside the vocabulary "
            f"[0, {int(raw['vocab_size']) - 1}]"
        )


def _int_field(raw: dict[str, Any], name: str, source: str) -> int:
    value = raw[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise DraftError(f"{source}: {name} must be an integer, got {value!r}")
    return value


def check_target_layer_ids(layer_ids: Any, num_target_layers: int, source: str) -> list[int]:
    """The target's layer-id rule (`models.target`), reported as a drafter config error."""
    try:
        return target_layer_ids_rule(layer_ids, num_target_layers, source)
    except TargetError as exc:
        raise DraftError(str(exc)) from exc


def _check_layer_types(hf: Qwen3Config, source: str) -> None:
    """DeepSpec drafters use full attention in every layer; sliding windows are not exported."""
    layer_types = list(hf.layer_types)
    if len(layer_types) != hf.num_hidden_layers:
        raise DraftError(
            f"{source}: layer_types has {len(layer_types)} entries for "
            f"num_hidden_layers={hf.num_hidden_layers}"
        )
    if any(kind != "full_attention" for kind in layer_types):
        raise DraftError(f"{source}: layer_types {layer_types} must all be 'full_attention'")


def _text_config(target_config: PretrainedConfig) -> PretrainedConfig:
    """The language-model part of a (possibly multimodal) target config."""
    get_text_config = getattr(target_config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else target_config


def check_target_compat(config: DSparkConfig, target_config: PretrainedConfig) -> None:
    """The drafter must share the target's hidden size, vocabulary and layer count."""
    target = _text_config(target_config)
    pairs = (
        ("hidden_size", config.hidden_size, int(target.hidden_size)),
        ("vocab_size", config.vocab_size, int(target.vocab_size)),
        ("num_target_layers", config.num_target_layers, int(target.num_hidden_layers)),
    )
    for name, draft_value, target_value in pairs:
        if draft_value != target_value:
            target_name = "num_hidden_layers" if name == "num_target_layers" else name
            raise DraftError(
                f"{config.source}: {name} is {draft_value} but the target's {target_name} is "
                f"{target_value}; this drafter was not trained for this target"
            )
    check_target_layer_ids(config.target_layer_ids, int(target.num_hidden_layers), config.source)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Eager GQA attention of q [B, H, G, D] over k/v [B, Hk, N, D] where valid [B, N].

    Query heads are folded onto their KV head (head h uses KV head h // (H / Hk), as
    `repeat_kv`) instead of repeating K/V, and the softmax runs in fp32 like HF's eager path.
    Returns [B, G, H * D].
    """
    batch, num_heads, block, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q = q.reshape(batch, num_kv_heads, -1, head_dim)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    scores = scores.masked_fill(~valid[:, None, None, :], torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(weights, v).reshape(batch, num_heads, block, head_dim)
    return out.transpose(1, 2).reshape(batch, block, num_heads * head_dim)


def packed_attention(
    q: torch.Tensor, block_k: torch.Tensor, block_v: torch.Tensor, context_k: torch.Tensor,
    context_v: torch.Tensor, context_valid: torch.Tensor, block_size: int, scaling: float,
) -> torch.Tensor:
    """`masked_attention` for A blocks packed along the query axis (training).

    q [B, H, A*G, D] and block_k/v [B, Hk, A*G, D] are the blocks' own queries, keys and
    values; context_k/v [B, Hk, L, D] are shared. Query (a, g) sees the context positions where
    context_valid [B, A*G, L] holds, and the G keys of its own block a; the two score parts
    share one fp32 softmax. The block part is [.., A, G, G], never [.., A*G, A*G].
    Returns [B, A*G, H * D].
    """
    batch, num_heads, packed, head_dim = q.shape
    num_kv_heads, length = context_k.shape[1], context_k.shape[2]
    group, blocks = num_heads // num_kv_heads, packed // block_size
    qg = q.reshape(batch, num_kv_heads, group, blocks, block_size, head_dim)
    context_scores = torch.matmul(qg.reshape(batch, num_kv_heads, -1, head_dim),
                                  context_k.transpose(2, 3)) * scaling
    context_scores = context_scores.reshape(batch, num_kv_heads, group, blocks, block_size,
                                            length)
    valid = context_valid.reshape(batch, 1, 1, blocks, block_size, length)
    context_scores = context_scores.masked_fill(~valid, torch.finfo(context_scores.dtype).min)
    bk = block_k.reshape(batch, num_kv_heads, 1, blocks, block_size, head_dim)
    bv = block_v.reshape(batch, num_kv_heads, 1, blocks, block_size, head_dim)
    block_scores = torch.matmul(qg, bk.transpose(-1, -2)) * scaling
    weights = torch.softmax(torch.cat([context_scores, block_scores], dim=-1), dim=-1,
                            dtype=torch.float32).to(q.dtype)
    # split, not two slices: its backward concatenates instead of zero-filling twice
    context_weights, block_weights = weights.split([length, block_size], dim=-1)
    out = torch.matmul(block_weights, bv) + torch.matmul(
        context_weights.reshape(batch, num_kv_heads, -1, length), context_v
    ).reshape(batch, num_kv_heads, group, blocks, block_size, head_dim)
    out = out.reshape(batch, num_heads, packed, head_dim)
    return out.transpose(1, 2).reshape(batch, packed, num_heads * head_dim)


class DSparkAttention(nn.Module):
    """Block queries over [cached context; new context; block] keys, no causal mask."""

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        hf = config.hf
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        q_width = self.num_heads * self.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        bias = bool(hf.attention_bias)
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=bias)
        self.o_proj = nn.Linear(q_width, config.hidden_size, bias=bias)
        self.q_norm = Qwen3RMSNorm(self.head_dim, eps=hf.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(self.head_dim, eps=hf.rms_norm_eps)

    def project_kv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K (k_proj -> k_norm -> RoPE) and V of x [B, N, d], each [B, Hk, N, Dd]."""
        batch, length, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        return apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        prefix_keys: torch.Tensor,
        prefix_values: torch.Tensor,
        valid: torch.Tensor,
        packed_block: int | None = None,
    ) -> torch.Tensor:
        """`valid` [B, S + G] over [prefix; block] keys, or with `packed_block` set, x holds
        A blocks of that size and `valid` [B, A * G, S] is each query's prefix mask."""
        batch, block, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, block, self.num_heads, self.head_dim))
        q = apply_rope(q.transpose(1, 2), cos, sin)
        block_keys, block_values = self.project_kv(x, cos, sin)
        if packed_block is not None:
            return self.o_proj(packed_attention(q, block_keys, block_values, prefix_keys,
                                                prefix_values, valid, packed_block,
                                                self.scaling))
        keys = torch.cat([prefix_keys, block_keys], dim=2)
        values = torch.cat([prefix_values, block_values], dim=2)
        return self.o_proj(masked_attention(q, keys, values, valid, self.scaling))


class DSparkDecoderLayer(nn.Module):
    """Pre-norm residual block: attention then Qwen3 MLP, as DeepSpec's decoder layer."""

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        eps = config.hf.rms_norm_eps
        self.self_attn = DSparkAttention(config)
        self.mlp = Qwen3MLP(config.hf)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=eps)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        prefix_keys: torch.Tensor,
        prefix_values: torch.Tensor,
        valid: torch.Tensor,
        packed_block: int | None = None,
    ) -> torch.Tensor:
        attn = self.self_attn(
            self.input_layernorm(hidden), cos, sin, prefix_keys, prefix_values, valid,
            packed_block,
        )
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DSparkDrafter(nn.Module):
    """DeepSpec's Qwen3DSparkModel with explicit-tensor inference methods.

    The parameter tree (and so `state_dict()` names) equals DeepSpec's; `rotary_emb` holds
    only computed buffers, which are never saved.
    """

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        self.config = config
        hf = config.hf
        d, vocab = config.hidden_size, config.vocab_size
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(DSparkDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = Qwen3RMSNorm(d, eps=hf.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(hf)
        self.fc = nn.Linear(config.feature_size, d, bias=False)
        self.hidden_norm = Qwen3RMSNorm(d, eps=hf.rms_norm_eps)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.markov_head = build_markov_head(
            config.markov_head_type or "", vocab, config.markov_rank, d
        )
        self.confidence_head = None
        if config.enable_confidence_head:
            extra = config.markov_rank if config.confidence_head_with_markov else 0
            self.confidence_head = ConfidenceHead(d + extra)
        # A draft vocabulary (restrict_vocab): its ids and the lm_head / W2 rows for them.
        # Derived from the weights above, so never saved (the checkpoint stays DeepSpec's).
        for name in ("draft_vocab", "draft_lm_weight", "draft_w2_weight"):
            self.register_buffer(name, None, persistent=False)

    def restrict_vocab(self, token_ids: torch.Tensor | Sequence[int]) -> None:
        """Draft over these token ids only (models/draft_vocab.py): `backbone` then returns
        logits over them and `markov_sample` maps its picks back to token ids. Copies the
        lm_head and W2 rows as they are now, so call it after the weights are loaded."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.lm_head.weight.device)
        ids = torch.unique(ids, sorted=True)
        if ids.numel() == 0 or int(ids[0]) < 0 or int(ids[-1]) >= self.config.vocab_size:
            raise DraftError(f"a draft vocabulary needs ids in 0..{self.config.vocab_size - 1}")
        self.draft_vocab = ids
        self.draft_lm_weight = self.lm_head.weight.detach()[ids].clone()
        if self.markov_head is not None:
            self.draft_w2_weight = self.markov_head.markov_w2.weight.detach()[ids].clone()

    def set_target_weights(
        self, embeddings: torch.Tensor | nn.Module, lm_head: torch.Tensor | nn.Module
    ) -> None:
        """Copy in the target's (frozen) input embeddings and lm_head, checking shapes."""
        for name, source in (("embed_tokens.weight", embeddings), ("lm_head.weight", lm_head)):
            target = self.get_parameter(name)
            weight = _as_weight(source, name, list(target.shape), "set_target_weights")
            with torch.no_grad():
                target.copy_(weight)

    def context_kv(
        self, features: torch.Tensor, positions: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer K/V [B, Hkd, C, Dd] of context positions from target features [B, C, F].

        Context positions are never queries: each layer only projects hidden_norm(fc(features))
        to keys (k_norm, RoPE at `positions`) and values, exactly as DeepSpec does for
        `target_hidden_states`.
        """
        context = self.hidden_norm(self.fc(features))
        cos, sin = self.rotary_emb(context, positions)
        pairs = [layer.self_attn.project_kv(context, cos, sin) for layer in self.layers]
        return [k for k, _ in pairs], [v for _, v in pairs]

    def backbone(
        self,
        block_ids: torch.Tensor,
        block_positions: torch.Tensor,
        context_features: torch.Tensor,
        context_positions: torch.Tensor,
        context_lengths: torch.Tensor,
        past_lengths: torch.Tensor,
        past_keys: list[torch.Tensor],
        past_values: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """One parallel pass over a block: (hidden [B,G,d], base logits [B,G,V] fp32, new K, new V).

        Block queries see cache slots < past_lengths[b], new context c < context_lengths[b]
        and every block position; this equals DeepSpec's `_forward_backbone` with its training
        mask (context kv < anchor position, same-block draft kv).
        """
        new_keys, new_values = self.context_kv(context_features, context_positions)
        valid = _valid_mask(
            past_lengths, past_keys[0].shape[2], context_lengths, context_features.shape[1],
            block_ids.shape[1],
        )
        prefix_keys = [torch.cat(kv, dim=2) for kv in zip(past_keys, new_keys)]
        prefix_values = [torch.cat(kv, dim=2) for kv in zip(past_values, new_values)]
        hidden = self.block_hidden(block_ids, block_positions, prefix_keys, prefix_values, valid)
        logits = torch.nn.functional.linear(hidden, self._scored_weights()[0])
        return hidden, logits.float(), new_keys, new_values

    def _scored_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(lm_head, Markov W2) rows of the tokens the drafter scores: all V, or its draft
        vocabulary's (W2 is None without a Markov head)."""
        if self.draft_vocab is not None:
            return self.draft_lm_weight, self.draft_w2_weight
        head = self.markov_head
        return self.lm_head.weight, None if head is None else head.markov_w2.weight

    def block_hidden(
        self,
        block_ids: torch.Tensor,
        block_positions: torch.Tensor,
        prefix_keys: list[torch.Tensor],
        prefix_values: list[torch.Tensor],
        valid: torch.Tensor,
        packed_block: int | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, Q, d] of block queries over per-layer prefix K/V plus
        the queries' own K/V (`DSparkAttention.forward` says what `valid` holds)."""
        hidden = self.embed_tokens(block_ids)
        cos, sin = self.rotary_emb(hidden, block_positions)
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, cos, sin, prefix_keys[i], prefix_values[i], valid,
                           packed_block)
        return self.norm(hidden)

    def packed_block_hidden(
        self, features: torch.Tensor, anchors: torch.Tensor, anchor_ids: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced block hidden states [S, A, G, d] for A anchors per sequence at once.

        features [S, L, F] are the target's features of each whole sequence; block a of row s
        is [anchor_ids[s, a], MASK x (G-1)] at positions anchors[s, a] + 0..G-1 and sees the
        context positions < anchors[s, a] and its own block only. That is `backbone` with a
        cache of the context before the anchor (what decoding has), computed for all of a
        sequence's blocks in one packed pass with no per-block copy of the context K/V.
        """
        seqs, length = features.shape[:2]
        num_anchors, gamma = anchors.shape[1], self.config.block_size
        device = features.device
        positions = torch.arange(length, device=device)[None].expand(seqs, -1)
        keys, values = self.context_kv(features, positions)
        offsets = torch.arange(gamma, device=device)
        block_ids = torch.full((seqs, num_anchors, gamma), self.config.mask_token_id,
                               dtype=torch.long, device=device)
        block_ids[:, :, 0] = anchor_ids
        block_positions = (anchors[:, :, None] + offsets).reshape(seqs, -1)
        context = torch.arange(length, device=device)[None, None, :] < anchors[:, :, None]
        context = context[:, :, None, :].expand(-1, -1, gamma, -1).reshape(seqs, -1, length)
        hidden = self.block_hidden(block_ids.reshape(seqs, -1), block_positions, keys, values,
                                   context, packed_block=gamma)
        return hidden.reshape(seqs, num_anchors, gamma, -1)

    def markov_sample(
        self,
        base_logits: torch.Tensor,
        hidden_states: torch.Tensor,
        anchor_ids: torch.Tensor,
        temperature: torch.Tensor,
        uniforms: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sequential stage: (draft ids [B,G] int64, draft probs [B,G,V] fp32, confidence [B,G]).

        Left to right, logits_k = U_k + bias(x_{k-1}, h_k, state) with x_0 = the anchor; the
        RNN head's state starts at zero. Rows with temperature <= 0 are greedy. The loop over
        G is Python, so an exported graph is unrolled over the block. With a draft vocabulary
        base_logits span it, and the probabilities are scattered back over all V tokens.
        """
        prev_ids = anchor_ids.to(torch.int64)
        state = None
        head, vocab = self.markov_head, self.draft_vocab
        w2_weight = self._scored_weights()[1]
        if head is not None:
            state = hidden_states.new_zeros(hidden_states.shape[0], self.config.markov_rank)
        ids, probs, confidences = [], [], []
        for k in range(base_logits.shape[1]):
            hidden = hidden_states[:, k]
            logits = base_logits[:, k].float()
            prev_emb = None
            if head is not None:
                prev_emb = head.prev_embeddings(prev_ids)
                w2_input, state = head.transition_input(prev_emb, hidden, state)
                logits = logits + torch.nn.functional.linear(w2_input, w2_weight).float()
            confidences.append(self._confidence_logit(hidden, prev_emb))
            prev_ids, step_probs = select_token(logits, temperature, uniforms[:, k])
            if vocab is not None:
                prev_ids = vocab[prev_ids]
                rows = step_probs.shape[0]
                step_probs = step_probs.new_zeros(rows, self.config.vocab_size).scatter(
                    1, vocab[None].expand(rows, -1), step_probs)
            ids.append(prev_ids)
            probs.append(step_probs)
        return torch.stack(ids, 1), torch.stack(probs, 1), torch.stack(confidences, 1)

    def _confidence_logit(
        self, hidden: torch.Tensor, prev_emb: torch.Tensor | None
    ) -> torch.Tensor:
        """c_k logit from [h_k; W1[x_{k-1}]] (or h_k alone); +30 with no confidence head."""
        if self.confidence_head is None:
            return torch.full_like(hidden[:, 0], NO_CONFIDENCE_LOGIT, dtype=torch.float32)
        if self.config.confidence_head_with_markov:
            hidden = torch.cat([hidden, prev_emb.to(hidden.dtype)], dim=-1)
        return self.confidence_head(hidden).float()


def _valid_mask(
    past_lengths: torch.Tensor,
    cache_len: int,
    context_lengths: torch.Tensor,
    context_len: int,
    block_len: int,
) -> torch.Tensor:
    """[B, S + C + G] bool: which keys a block query may see (see `DSparkDrafter.backbone`)."""
    device = past_lengths.device
    past = torch.arange(cache_len, device=device)[None, :] < past_lengths[:, None]
    context = torch.arange(context_len, device=device)[None, :] < context_lengths[:, None]
    block = torch.ones_like(past_lengths, dtype=torch.bool)[:, None].expand(-1, block_len)
    return torch.cat([past, context, block], dim=1)


def _as_weight(
    source: torch.Tensor | nn.Module, name: str, shape: list[int], where: str
) -> torch.Tensor:
    """A weight tensor from a tensor or a module with `.weight`, shape-checked."""
    weight = source.weight if isinstance(source, nn.Module) else source
    if not isinstance(weight, torch.Tensor):
        raise DraftError(f"{where}: {name} must be a tensor or a module with .weight")
    if list(weight.shape) != shape:
        raise DraftError(
            f"{where}: the target's {name} has shape {list(weight.shape)}, but the drafter "
            f"expects {shape} (vocab_size x hidden_size)"
        )
    return weight.detach()


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

# Which config fields set each tensor's shape, for error messages (matched on the name's end).
_SHAPE_RULES = (
    ("fc.weight", "hidden_size x len(target_layer_ids) * hidden_size"),
    ("q_proj.weight", "num_attention_heads * head_dim x hidden_size"),
    ("q_proj.bias", "num_attention_heads * head_dim"),
    ("k_proj.weight", "num_key_value_heads * head_dim x hidden_size"),
    ("v_proj.weight", "num_key_value_heads * head_dim x hidden_size"),
    ("k_proj.bias", "num_key_value_heads * head_dim"),
    ("v_proj.bias", "num_key_value_heads * head_dim"),
    ("o_proj.weight", "hidden_size x num_attention_heads * head_dim"),
    ("q_norm.weight", "head_dim"),
    ("k_norm.weight", "head_dim"),
    ("down_proj.weight", "hidden_size x intermediate_size"),
    ("mlp.gate_proj.weight", "intermediate_size x hidden_size"),
    ("up_proj.weight", "intermediate_size x hidden_size"),
    ("layernorm.weight", "hidden_size"),
    ("norm.weight", "hidden_size"),
    ("embed_tokens.weight", "vocab_size x hidden_size"),
    ("lm_head.weight", "vocab_size x hidden_size"),
    ("markov_w1.weight", "vocab_size x markov_rank"),
    ("markov_w2.weight", "vocab_size x markov_rank"),
    ("markov_head.gate_proj.weight", "markov_rank x (hidden_size + markov_rank)"),
    ("joint_proj.weight", "3 * markov_rank x (2 * markov_rank + hidden_size)"),
    ("confidence_head.proj.weight", "1 x hidden_size (+ markov_rank with the Markov input)"),
)


def _shape_rule(name: str) -> str:
    return next((rule for suffix, rule in _SHAPE_RULES if name.endswith(suffix)), "the config")


def read_checkpoint_tensors(draft_dir: Path) -> dict[str, tuple[torch.Tensor, Path]]:
    """All tensors of `model.safetensors` or of the shards an index names, with their file.

    Like Hugging Face, a single `model.safetensors` wins over an index.
    """
    single = draft_dir / WEIGHTS_NAME
    index = draft_dir / WEIGHTS_INDEX_NAME
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = _shard_files(index)
    else:
        raise DraftError(
            f"{draft_dir}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in the drafter folder"
        )
    tensors: dict[str, tuple[torch.Tensor, Path]] = {}
    for path in files:
        try:
            loaded = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise DraftError(f"{path}: cannot read safetensors: {exc}") from exc
        for name, tensor in loaded.items():
            if name in tensors:
                raise DraftError(f"{path}: tensor {name} is also in {tensors[name][1]}")
            tensors[name] = (tensor, path)
    return tensors


def _shard_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DraftError(f"{index}: not a safetensors index with a weight_map: {exc}") from exc
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    for path in files:
        if not path.is_file():
            raise DraftError(f"{path}: shard named in {index.name} is missing")
    return files


def _assemble_state(
    model: DSparkDrafter,
    tensors: dict[str, tuple[torch.Tensor, Path]],
    draft_dir: Path,
    target_weights: dict[str, torch.Tensor | nn.Module | None],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Match checkpoint tensors to the module: names, shapes, and target fallbacks."""
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        path = tensors[unexpected[0]][1]
        raise DraftError(
            f"{path}: unexpected tensor(s) {', '.join(unexpected[:6])} for the drafter "
            f"described by {model.config.source}"
        )
    missing = sorted(set(expected) - set(tensors) - set(TARGET_TENSORS))
    if missing:
        raise DraftError(f"{draft_dir}: checkpoint lacks tensor(s) {', '.join(missing[:6])}")
    state = {}
    for name, shape in expected.items():
        if name in tensors:
            tensor, path = tensors[name]
            if list(tensor.shape) != shape:
                raise DraftError(
                    f"{path}: tensor {name} has shape {list(tensor.shape)}, but "
                    f"{model.config.source} implies {shape} ({_shape_rule(name)})"
                )
        else:
            source = target_weights[name]
            if source is None:
                arg = "target_embeddings" if name == "embed_tokens.weight" else "target_lm_head"
                raise DraftError(
                    f"{draft_dir}: {name} is not in the checkpoint; pass the target's weight "
                    f"as {arg}="
                )
            tensor = _as_weight(source, name, shape, str(draft_dir))
        state[name] = tensor.to(dtype)
    return state


def load_drafter(
    draft_dir: Path | str,
    target_config: PretrainedConfig | None = None,
    target_embeddings: torch.Tensor | nn.Module | None = None,
    target_lm_head: torch.Tensor | nn.Module | None = None,
    dtype: torch.dtype = torch.float32,
) -> DSparkDrafter:
    """Load a DeepSpec drafter folder, checking it against itself and (if given) the target.

    `embed_tokens.weight` / `lm_head.weight` come from the checkpoint when present (that is
    what DeepSpec loads) and otherwise from the target's tensors passed here, shared, not
    copied, when the dtype already matches.
    """
    draft_dir = Path(draft_dir)
    if not draft_dir.is_dir():
        raise DraftError(f"{draft_dir}: drafter folder not found")
    config = DSparkConfig.from_file(draft_dir / CONFIG_NAME)
    if target_config is not None:
        check_target_compat(config, target_config)
    tensors = read_checkpoint_tensors(draft_dir)
    with torch.device("meta"):
        model = DSparkDrafter(config)
    target_weights = {"embed_tokens.weight": target_embeddings, "lm_head.weight": target_lm_head}
    state = _assemble_state(model, tensors, draft_dir, target_weights, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary_emb = Qwen3RotaryEmbedding(config.hf)  # buffers are computed, not stored
    return model.eval()


def save_drafter(
    model: DSparkDrafter,
    out_dir: Path | str,
    include_embeddings: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write `config.json` + `model.safetensors` in DeepSpec's format, all or nothing.

    Files go to a temporary sibling folder that is renamed into place, so an interrupted
    save never leaves a half-written drafter. The target's embeddings and lm_head are left
    out unless asked for (they are the target's, frozen). A non-empty `out_dir` is replaced
    only with `overwrite=True`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DraftError(f"{out_dir}: exists and is not empty; pass overwrite=True to replace it")
    tensors = {
        name: tensor.detach().to("cpu", copy=True).contiguous()
        for name, tensor in model.state_dict().items()
        if include_embeddings or name not in TARGET_TENSORS
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        config_text = json.dumps(model.config.raw, indent=2, sort_keys=True) + "\n"
        (tmp / CONFIG_NAME).write_text(config_text)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(new: Path, final: Path) -> None:
    """Rename `new` onto `final`, moving an existing `final` aside first."""
    if not final.exists():
        new.rename(final)
        return
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    final.rename(old)
    new.rename(final)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


# --------------------------------------------------------------------------------------------
# Random drafters (tests, export checks, distillation starts)
# --------------------------------------------------------------------------------------------


def default_target_layer_ids(num_target_layers: int, count: int = 5) -> list[int]:
    """`count` layers spread over [1, L-3] like DeepSpec's [1, 9, 17, 25, 33] for L = 36.

    Never the last layer; -1 (the embedding output) only for a one-layer target.
    """
    last_allowed = num_target_layers - 2
    if last_allowed < 0:
        return [-1]
    low = min(1, last_allowed)
    high = max(low, num_target_layers - 3)
    if count == 1 or high == low:
        return [low]
    step = (high - low) / (count - 1)
    return sorted({int(low + i * step + 0.5) for i in range(count)})


def make_random_config(
    target_config: PretrainedConfig,
    *,
    num_layers: int = 1,
    block_size: int = 7,
    target_layer_ids: list[int] | None = None,
    markov_rank: int = DEFAULT_MARKOV_RANK,
    markov_head_type: str = "vanilla",
    confidence: bool = True,
    confidence_with_markov: bool = True,
    mask_token_id: int | None = None,
) -> DSparkConfig:
    """A DeepSpec drafter config for `target_config`, built the way DeepSpec builds it.

    The target config is deep-copied and DSpark fields are added; head_dim is written
    explicitly (target's head_dim, else hidden_size / num_attention_heads) because Qwen3Config
    would otherwise default it to 128.
    """
    target = _text_config(target_config)
    raw = json.loads(target.to_json_string(use_diff=False))
    num_target_layers = int(target.num_hidden_layers)
    head_dim = getattr(target, "head_dim", None) or target.hidden_size // target.num_attention_heads
    raw.update(
        architectures=[ARCHITECTURE],
        head_dim=int(head_dim),
        num_target_layers=num_target_layers,
        num_hidden_layers=num_layers,
        block_size=block_size,
        tie_word_embeddings=False,
        layer_types=["full_attention"] * num_layers,
        mask_token_id=int(target.vocab_size) - 1 if mask_token_id is None else mask_token_id,
        target_layer_ids=(
            default_target_layer_ids(num_target_layers)
            if target_layer_ids is None
            else list(target_layer_ids)
        ),
        num_anchors=DEFAULT_NUM_ANCHORS,
        enable_confidence_head=confidence,
        markov_rank=markov_rank,
    )
    if confidence:
        raw["confidence_head_with_markov"] = confidence_with_markov and markov_rank > 0
    if markov_rank > 0:
        raw["markov_head_type"] = markov_head_type
    return DSparkConfig.from_dict(raw, source=f"random drafter for {target.model_type}")


def make_random_drafter(
    target_config: PretrainedConfig,
    *,
    num_layers: int = 1,
    block_size: int = 7,
    target_layer_ids: list[int] | None = None,
    markov_rank: int = DEFAULT_MARKOV_RANK,
    markov_head_type: str = "vanilla",
    confidence: bool = True,
    confidence_with_markov: bool = True,
    seed: int = 0,
    mask_token_id: int | None = None,
) -> DSparkDrafter:
    """A seeded random drafter (weights N(0, 0.02), zero biases, unit norms) for a target.

    Embeddings and lm_head are random too; call `set_target_weights` to use the target's.
    """
    config = make_random_config(
        target_config,
        num_layers=num_layers,
        block_size=block_size,
        target_layer_ids=target_layer_ids,
        markov_rank=markov_rank,
        markov_head_type=markov_head_type,
        confidence=confidence,
        confidence_with_markov=confidence_with_markov,
        mask_token_id=mask_token_id,
    )
    model = DSparkDrafter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * INIT_STD)
    return model.eval()

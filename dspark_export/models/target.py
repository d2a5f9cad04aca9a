"""The target model with explicit KV tensors and DeepSpec feature taps.

Hugging Face models keep their cache in Python objects; an exported graph needs every tensor as
an input or output. `TargetAdapter` reuses the model's own modules (projections, norms, MLPs,
rotary embedding) and only rewrites attention, so its numerics are the library's, and it follows
the `target.onnx` contract in docs/graphs.md: whole cache buffers in, per-row valid lengths,
present K/V of the new tokens out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

# model_type -> whether attention normalises q and k per head (Qwen3).
SUPPORTED_ARCHITECTURES: dict[str, bool] = {
    "llama": False,
    "mistral": False,
    "qwen2": False,
    "qwen3": True,
}


class TargetError(ValueError):
    """A target folder or layer selection the toolchain cannot use."""


@dataclass(frozen=True)
class TargetShapes:
    """The sizes every graph and cache buffer is built from."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


def read_target_config(target_dir: Path) -> dict:
    """Read and check `config.json` before any weights are loaded."""
    config_path = Path(target_dir) / "config.json"
    if not config_path.is_file():
        raise TargetError(f"{config_path}: no config.json; expected a Hugging Face model folder")
    config = json.loads(config_path.read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise TargetError(
            f"{config_path}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    return config


def load_target(target_dir: Path | str, dtype: torch.dtype = torch.float32):
    """Load a supported causal LM and its tokenizer from a local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target_dir = Path(target_dir)
    read_target_config(target_dir)
    model = AutoModelForCausalLM.from_pretrained(
        target_dir, dtype=dtype, attn_implementation="eager"
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    return model, tokenizer


def check_target_layer_ids(layer_ids: object, num_layers: int, source: str = "target_layer_ids") -> list[int]:
    """DeepSpec's rule: -1 (embedding output) or a decoder layer, strictly increasing.

    The last layer is refused too: Hugging Face reports it after the final norm while DeepSpec
    trains on raw decoder-layer outputs, so features would silently differ.
    """
    if not isinstance(layer_ids, list) or not layer_ids:
        raise TargetError(f"{source}: target_layer_ids must be a non-empty list, got {layer_ids!r}")
    if any(isinstance(i, bool) or not isinstance(i, int) for i in layer_ids):
        raise TargetError(f"{source}: target_layer_ids must be integers, got {layer_ids!r}")
    last = int(num_layers) - 1
    for previous, current in zip(layer_ids, layer_ids[1:]):
        if current <= previous:
            raise TargetError(f"{source}: target_layer_ids {layer_ids} must be strictly increasing")
    for layer_id in layer_ids:
        if not (layer_id == -1 or 0 <= layer_id <= last):
            raise TargetError(
                f"{source}: target_layer_ids entry {layer_id} is out of range "
                f"{{-1}} U [0, {last}] for a target with {num_layers} layers"
            )
        if layer_id == last:
            raise TargetError(
                f"{source}: target_layer_ids entry {layer_id} is the target's last layer; Hugging "
                "Face reports that layer after the final norm, DeepSpec trains on raw outputs"
            )
    return list(layer_ids)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on `[B, H, T, D]` with `cos`/`sin` of shape `[B, T, D]` (HF's apply_rotary_pos_emb)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def masked_attention(
    q: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    past_valid: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    new_valid: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Attention over a cache buffer and new keys, without concatenating the cache.

    q: `[B, H, T, D]`; past_k/v: `[B, Hk, S, D]`; new_k/v: `[B, Hk, N, D]`; past_valid
    `[B, 1, 1|T, S]` and new_valid `[B, 1, 1|T, N]` are boolean masks. Grouped-query heads are
    folded into the query axis so K/V are never repeated; the two score blocks share one
    softmax, so the cache is read in place instead of copied into a concatenation.
    """
    batch, heads, tokens, dim = q.shape
    kv_heads = past_k.shape[1]
    group = heads // kv_heads
    qg = q.reshape(batch, kv_heads, group * tokens, dim)
    past_scores = torch.matmul(qg, past_k.transpose(-1, -2)) * scaling
    new_scores = torch.matmul(qg, new_k.transpose(-1, -2)) * scaling
    floor = torch.finfo(past_scores.dtype).min
    past_valid = past_valid.repeat(1, 1, group, 1) if past_valid.shape[2] > 1 else past_valid
    new_valid = new_valid.repeat(1, 1, group, 1) if new_valid.shape[2] > 1 else new_valid
    past_scores = torch.where(past_valid, past_scores, floor)
    new_scores = torch.where(new_valid, new_scores, floor)
    probs = torch.softmax(torch.cat([past_scores, new_scores], dim=-1).float(), dim=-1)
    probs = probs.to(q.dtype)
    past_len = past_k.shape[2]
    out = torch.matmul(probs[..., :past_len], past_v) + torch.matmul(probs[..., past_len:], new_v)
    return out.reshape(batch, heads, tokens, dim)


class TargetAdapter(nn.Module):
    """A Hugging Face causal LM with explicit caches, per-row lengths and feature taps."""

    def __init__(self, model: nn.Module, target_layer_ids: list[int]):
        super().__init__()
        config = model.config
        if config.model_type not in SUPPORTED_ARCHITECTURES:
            raise TargetError(
                f"model_type {config.model_type!r} is not supported; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        self.model = model
        self.qk_norm = SUPPORTED_ARCHITECTURES[config.model_type]
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.shapes = TargetShapes(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
        )
        self.target_layer_ids = check_target_layer_ids(target_layer_ids, config.num_hidden_layers)
        self.scaling = head_dim**-0.5

    @property
    def feature_dim(self) -> int:
        return len(self.target_layer_ids) * self.shapes.hidden_size

    def empty_cache(self, batch: int, length: int = 0, dtype: torch.dtype | None = None):
        """Zero cache buffers `[B, Hk, S, D]` for every layer (keys, values)."""
        s = self.shapes
        dtype = dtype or next(self.parameters()).dtype
        shape = (batch, s.num_kv_heads, length, s.head_dim)
        keys = [torch.zeros(shape, dtype=dtype) for _ in range(s.num_layers)]
        values = [torch.zeros(shape, dtype=dtype) for _ in range(s.num_layers)]
        return keys, values

    def _attention(self, layer, x, cos, sin, past_k, past_v, past_valid, new_valid):
        attn = layer.self_attn
        s = self.shapes
        batch, tokens, _ = x.shape
        q = attn.q_proj(x).view(batch, tokens, s.num_heads, s.head_dim)
        k = attn.k_proj(x).view(batch, tokens, s.num_kv_heads, s.head_dim)
        v = attn.v_proj(x).view(batch, tokens, s.num_kv_heads, s.head_dim)
        if self.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        out = masked_attention(q, past_k, past_v, past_valid, k, v, new_valid, self.scaling)
        out = out.transpose(1, 2).reshape(batch, tokens, s.num_heads * s.head_dim)
        return attn.o_proj(out), k, v

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        past_lengths: torch.Tensor,
        new_lengths: torch.Tensor,
        past_keys: list[torch.Tensor],
        past_values: list[torch.Tensor],
    ):
        """Returns `(logits fp32 [B,T,V], features [B,T,F], present_keys, present_values)`."""
        inner = self.model.model
        hidden = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(hidden, position_ids)
        tokens = input_ids.shape[1]
        cache_len = past_keys[0].shape[2]
        past_valid = torch.arange(cache_len, device=input_ids.device)[None, :] < past_lengths[:, None]
        past_valid = past_valid[:, None, None, :]
        idx = torch.arange(tokens, device=input_ids.device)
        causal = idx[None, :] <= idx[:, None]
        new_valid = causal[None, :, :] & (idx[None, None, :] < new_lengths[:, None, None])
        new_valid = new_valid[:, None, :, :]
        taps = {-1: hidden} if -1 in self.target_layer_ids else {}
        present_keys, present_values = [], []
        for i, layer in enumerate(inner.layers):
            residual = hidden
            attn_out, k, v = self._attention(
                layer, layer.input_layernorm(hidden), cos, sin,
                past_keys[i], past_values[i], past_valid, new_valid,
            )
            hidden = residual + attn_out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            present_keys.append(k)
            present_values.append(v)
            if i in self.target_layer_ids:
                taps[i] = hidden
        features = torch.cat([taps[i] for i in self.target_layer_ids], dim=-1)
        logits = self.model.lm_head(inner.norm(hidden)).float()
        return logits, features, present_keys, present_values

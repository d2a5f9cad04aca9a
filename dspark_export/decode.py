"""PyTorch reference decoding: the ground truth every compiled backend is compared with.

Eager and batch 1, written for clarity. It follows DeepSpec's evaluator: prefill gives the first
token (the anchor); each round drafts a block from the anchor, verifies `[anchor, x_1..x_l]`
with the target, commits the anchor and the accepted drafts, and the correction (or bonus)
token becomes the next anchor. Randomness comes from one `numpy.random.default_rng(seed)` drawn
in a fixed order (first token: 1 draw; each round: G for the Markov stage, then G + 1 for
verification; each target-only token: 1), so the runtime reproduces sampled output exactly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from dspark_export.models.draft import DSparkDrafter
from dspark_export.models.markov import inverse_cdf_sample, select_token
from dspark_export.models.target import TargetAdapter
from dspark_runtime.schedule import FixedScheduler, Scheduler

# Residual mass below which verification falls back to the target distribution (DeepSpec).
RESIDUAL_EPS = 1e-8


@dataclass
class DecodeStats:
    """Per-generation counters; tau counts the bonus/correction token, as the paper does."""

    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    accepted: list[int] = field(default_factory=list)  # accepted drafts per round
    verified: list[int] = field(default_factory=list)  # drafts submitted per round

    @property
    def tau(self) -> float:
        return float(np.mean(self.accepted) + 1.0) if self.accepted else 1.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def acceptance_per_position(self) -> list[float]:
        """P(draft k accepted | drafts < k accepted and k verified), k = 1..G."""
        longest = max(self.verified, default=0)
        rates = []
        for k in range(1, longest + 1):
            reached = sum(1 for a, v in zip(self.accepted, self.verified) if v >= k and a >= k - 1)
            passed = sum(1 for a in self.accepted if a >= k)
            rates.append(passed / reached if reached else float("nan"))
        return rates

    def to_dict(self) -> dict:
        return {
            "new_tokens": self.new_tokens,
            "rounds": len(self.accepted),
            "tau": self.tau,
            "acceptance_per_position": self.acceptance_per_position(),
            "tokens_per_s": self.tokens_per_s,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
        }


@dataclass
class DecodeResult:
    tokens: list[int]
    stats: DecodeStats


class _Cache:
    """Growing per-layer K/V tensors `[1, Hk, S, D]` for one sequence."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def commit(self, keys: list[torch.Tensor], values: list[torch.Tensor], count: int) -> None:
        self.keys = [torch.cat([c, k[:, :, :count]], 2) for c, k in zip(self.keys, keys)]
        self.values = [torch.cat([c, v[:, :, :count]], 2) for c, v in zip(self.values, values)]


def _target_step(adapter: TargetAdapter, cache: _Cache, ids: list[int]):
    start = cache.length
    input_ids = torch.tensor([ids])
    positions = torch.arange(start, start + len(ids))[None]
    return adapter(input_ids, positions, torch.tensor([start]), torch.tensor([len(ids)]),
                   cache.keys, cache.values)


def _prefill(adapter: TargetAdapter, prompt_ids: list[int], temperature: float,
             rng: np.random.Generator, stats: DecodeStats) -> tuple[_Cache, torch.Tensor, int]:
    """Run the prompt: (target cache, its features (not yet in any draft cache), first token)."""
    t0 = time.perf_counter()
    cache = _Cache(*adapter.empty_cache(1, 0))
    logits, features, keys, values = _target_step(adapter, cache, prompt_ids)
    cache.commit(keys, values, len(prompt_ids))
    first = _sample(logits[0, -1], temperature, rng.random())
    stats.prefill_s = time.perf_counter() - t0
    return cache, features, first


def _sample(logits: torch.Tensor, temperature: float, u: float) -> int:
    ids, _ = select_token(logits[None], torch.tensor([temperature]), torch.tensor([u]))
    return int(ids[0])


def verify_block(
    target_logits: torch.Tensor,
    draft_ids: torch.Tensor,
    draft_probs: torch.Tensor,
    temperature: float,
    uniforms: np.ndarray,
) -> tuple[int, int]:
    """Lossless verification of one row: (accepted drafts, correction or bonus token).

    target_logits `[l+1, V]`, draft_ids `[l]`, draft_probs `[l, V]`, uniforms `[G+1]`
    (uniforms[k] tests draft k, the last one samples the final token).
    """
    verify_len = draft_ids.shape[0]
    if temperature <= 0:
        target_ids = torch.argmax(target_logits, dim=-1)
        accepted = 0
        while accepted < verify_len and int(draft_ids[accepted]) == int(target_ids[accepted]):
            accepted += 1
        return accepted, int(target_ids[accepted])
    p = torch.softmax(target_logits.float() / temperature, dim=-1)
    accepted = 0
    while accepted < verify_len:
        x = int(draft_ids[accepted])
        if not uniforms[accepted] * float(draft_probs[accepted, x]) < float(p[accepted, x]):
            break
        accepted += 1
    final = p[accepted]
    if accepted < verify_len:
        residual = torch.clamp(p[accepted] - draft_probs[accepted], min=0.0)
        final = residual if float(residual.sum()) > RESIDUAL_EPS else p[accepted]
    token = inverse_cdf_sample(final[None], torch.tensor([float(uniforms[-1])]))
    return accepted, int(token[0])


def _finish(tokens: list[int], stop_ids: set[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """Cut at the first stop token (kept) or at the budget; True when generation is over."""
    for i, t in enumerate(tokens[:max_new_tokens]):
        if t in stop_ids:
            return tokens[: i + 1], True
    return tokens[:max_new_tokens], len(tokens) >= max_new_tokens


@torch.no_grad()
def generate_target_only(
    adapter: TargetAdapter,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    stop_ids: set[int] = frozenset(),
) -> DecodeResult:
    """Plain autoregressive decoding with the target alone."""
    rng = np.random.default_rng(seed)
    stats = DecodeStats()
    cache, _, first = _prefill(adapter, prompt_ids, temperature, rng, stats)
    t0 = time.perf_counter()
    out, done = _finish([first], stop_ids, max_new_tokens)
    while not done:
        logits, _, keys, values = _target_step(adapter, cache, out[-1:])
        cache.commit(keys, values, 1)
        out, done = _finish(out + [_sample(logits[0, -1], temperature, rng.random())], stop_ids, max_new_tokens)
    stats.decode_s = time.perf_counter() - t0
    stats.new_tokens = len(out)
    return DecodeResult(out, stats)


@torch.no_grad()
def generate_speculative(
    adapter: TargetAdapter,
    drafter: DSparkDrafter,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    stop_ids: set[int] = frozenset(),
    scheduler: Scheduler | None = None,
) -> DecodeResult:
    """DSpark speculative decoding; `scheduler` picks the verify length (default: whole block).

    The scheduler sees the per-step confidences sigmoid(logit) of this round's block, as the
    runtime's do (batch of one row).
    """
    rng = np.random.default_rng(seed)
    gamma = drafter.config.block_size
    scheduler = scheduler or FixedScheduler(gamma)
    scheduler.reset()
    active = np.ones(1, dtype=bool)
    stats = DecodeStats()
    cache, pending, first = _prefill(adapter, prompt_ids, temperature, rng, stats)
    c = drafter.config
    empty = torch.zeros(1, c.num_kv_heads, 0, c.head_dim, dtype=pending.dtype)
    draft_cache = _Cache([empty] * c.num_layers, [empty] * c.num_layers)
    t0 = time.perf_counter()
    out, done = _finish([first], stop_ids, max_new_tokens)
    temp = torch.tensor([temperature])
    while not done:
        anchor, anchor_pos = out[-1], cache.length
        ctx_len = pending.shape[1]
        block_ids = torch.full((1, gamma), drafter.config.mask_token_id)
        block_ids[0, 0] = anchor
        hidden, base_logits, dk, dv = drafter.backbone(
            block_ids, anchor_pos + torch.arange(gamma)[None], pending,
            torch.arange(anchor_pos - ctx_len, anchor_pos)[None], torch.tensor([ctx_len]),
            torch.tensor([draft_cache.length]), draft_cache.keys, draft_cache.values,
        )
        draft_cache.commit(dk, dv, ctx_len)
        draft_ids, draft_probs, conf = drafter.markov_sample(
            base_logits, hidden, torch.tensor([anchor]), temp, torch.from_numpy(rng.random(gamma))[None].float()
        )
        verify_len = int(scheduler.verify_lengths(torch.sigmoid(conf).double().numpy(), active)[0])
        u_verify = rng.random(gamma + 1)
        t_logits, t_features, keys, values = _target_step(
            adapter, cache, [anchor] + draft_ids[0, :verify_len].tolist()
        )
        accepted, token = verify_block(
            t_logits[0], draft_ids[0, :verify_len], draft_probs[0, :verify_len], temperature, u_verify
        )
        cache.commit(keys, values, accepted + 1)
        pending = t_features[:, : accepted + 1]
        stats.accepted.append(accepted)
        stats.verified.append(verify_len)
        out, done = _finish(out + draft_ids[0, :accepted].tolist() + [token], stop_ids, max_new_tokens)
    stats.decode_s = time.perf_counter() - t0
    stats.new_tokens = len(out)
    return DecodeResult(out, stats)

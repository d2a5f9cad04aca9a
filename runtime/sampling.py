"""Seeded uniforms and the one token-selection rule every backend shares.

Randomness never lives inside a graph: each request owns a `numpy.random.default_rng(seed)`
and hands uniforms to the graphs. The draw order is fixed (docs/graphs.md, and the PyTorch
reference follows it), so the runtime reproduces the reference token for token when sampling:

- after prefill: one uniform for the first token;
- per speculative step: `G` uniforms for `markov`, then `G + 1` for `SpecVerify`;
- per target-only step: one uniform.

Greedy rows draw too (and ignore the draws), so greedy and sampled rows stay aligned.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class RequestRandomness:
    """One generator per request row, drawn in the fixed order above."""

    def __init__(self, seeds: Sequence[int]) -> None:
        self.generators = [np.random.default_rng(int(s)) for s in seeds]

    def reseed(self, row: int, seed: int) -> None:
        """A new request in `row` (a slot freed by another) starts its own stream."""
        self.generators[row] = np.random.default_rng(int(seed))

    def draw_row(self, row: int, count: int) -> np.ndarray:
        """float32 [1, count] for one row only."""
        return self.generators[row].random(count).astype(np.float32)[None]

    def draw(self, count: int, rows: np.ndarray) -> np.ndarray:
        """float32 [B, count]; only `rows` (bool [B]) draw, others stay 0 and keep their state.

        Finished rows do not draw, so a row's stream never depends on its batch neighbours.
        """
        out = np.zeros((len(self.generators), count), dtype=np.float32)
        for b in np.flatnonzero(rows):
            out[b] = self.generators[b].random(count)
        return out


def select_tokens(logits: np.ndarray, temperature: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """One token per row of `logits` [B, V]: argmax where temperature <= 0, else inverse CDF.

    Inverse CDF over softmax(logits / T): token = #{i : cdf[i] <= u * cdf[-1]}, clamped to
    V - 1 (docs/graphs.md), computed in float32 like the graphs.
    """
    logits = np.asarray(logits, dtype=np.float32)
    out = logits.argmax(axis=-1).astype(np.int64)
    for b in np.flatnonzero(temperature > 0):
        scaled = logits[b] / np.float32(temperature[b])
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum(dtype=np.float32)
        cdf = np.cumsum(probs, dtype=np.float32)
        threshold = np.float32(uniforms[b]) * cdf[-1]
        out[b] = min(int(np.count_nonzero(cdf <= threshold)), logits.shape[-1] - 1)
    return out

"""Runtime-owned KV caches: preallocated buffers, per-row lengths, prefix commits.

A cache is one `[B, H, S, D]` buffer per layer and per K/V (docs/graphs.md). Graphs read the
whole buffer and mask positions `>= lengths[b]`, so a step passes the buffers themselves (no
copy) and the graph returns K/V of the new positions only. `commit` then writes the accepted
prefix of those new positions at each row's length: O(new tokens) per step, and rejected drafts
never need rolling back. Where the buffers live is the backend's business (`Memory`): numpy on
the host for the CPU provider, device memory for CUDA.

Because a graph's attention reads all S positions, S follows the longest live row rather than
the cache's capacity: the buffers start small, grow (with headroom) when a commit needs room,
and shrink when the long rows have left (`fit`). A server's 2048-position slots would otherwise
make every decode step attend over 2048 masked positions.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np


class Memory(Protocol):
    """Where a backend keeps cache buffers and how it copies between them."""

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """A new zero-filled buffer (masked slots are still read, and 0 * NaN is NaN)."""

    def rows(self, buffer: Any, lo: int, hi: int) -> Any:
        """A zero-copy view of rows `lo:hi` (axis 0) of a buffer."""

    def commit(self, caches: list[Any], presents: list[Any], lengths: np.ndarray,
               counts: np.ndarray) -> None:
        """For each (cache, present) pair and row b:
        cache[b, :, lengths[b]:lengths[b] + counts[b]] = present[b, :, :counts[b]]."""

    def leading(self, array: Any, n: int) -> Any:
        """array[:, :n] as a contiguous array (a view where the layout allows)."""

    def reshape(self, array: Any, shape: tuple[int, ...]) -> Any:
        """A zero-copy view of a contiguous array with another shape of the same size."""

    def synchronize(self) -> None:
        """Make finished commits visible to the next graph run."""

    def resized(self, buffer: Any, length: int) -> Any:
        """A new zero-filled `[B, H, length, D]` buffer holding `buffer`'s first
        min(S, length) positions."""

    def copy_prefix(self, buffer: Any, src: int, dst: int, n: int) -> None:
        """buffer[dst, :, :n] = buffer[src, :, :n] (another row's cached prefix)."""


def prefix_indices(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, step) index pairs of the first counts[b] steps of every row b, row by row."""
    rows = np.repeat(np.arange(len(counts)), counts)
    return rows, np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)


# Up to this many committing rows, HostMemory.commit copies row by row (measured faster).
_SLICED_ROWS = 3


class HostMemory:
    """numpy buffers: ONNX Runtime's CPU provider reads them in place."""

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def rows(self, buffer: np.ndarray, lo: int, hi: int) -> np.ndarray:
        return buffer[lo:hi]

    def commit(self, caches: list[np.ndarray], presents: list[np.ndarray], lengths: np.ndarray,
               counts: np.ndarray) -> None:
        """A few rows: one slice copy per row and buffer (a decode step at batch 1 commits in
        a third of the fancy-indexed time). More: one fancy-indexed copy per buffer, whatever
        the batch, its (row, slot) index pairs built once for all layers."""
        live = np.flatnonzero(counts)
        if len(live) <= _SLICED_ROWS:
            spans = [(b, int(lengths[b]), int(counts[b])) for b in live]
            for cache, present in zip(caches, presents):
                for b, start, n in spans:
                    cache[b, :, start:start + n] = present[b, :, :n]
            return
        rows, src = prefix_indices(counts)
        dst = lengths[rows] + src
        for cache, present in zip(caches, presents):
            cache[rows, :, dst] = present[rows, :, src]

    def leading(self, array: np.ndarray, n: int) -> np.ndarray:
        return array if n == array.shape[1] else np.ascontiguousarray(array[:, :n])

    def reshape(self, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return array.reshape(shape)

    def synchronize(self) -> None:
        pass

    def resized(self, buffer: np.ndarray, length: int) -> np.ndarray:
        out = np.zeros((*buffer.shape[:2], length, buffer.shape[3]), dtype=buffer.dtype)
        keep = min(length, buffer.shape[2])
        out[:, :, :keep] = buffer[:, :, :keep]
        return out

    def copy_prefix(self, buffer: np.ndarray, src: int, dst: int, n: int) -> None:
        buffer[dst, :, :n] = buffer[src, :, :n]


# Granularity of buffer lengths: few distinct shapes, little masked waste.
ALLOCATION_STEP = 64


def allocation(needed: int, capacity: int) -> int:
    """Buffer length for `needed` positions: a quarter more (so growth copies are rare),
    rounded up to `ALLOCATION_STEP`, at most `capacity`."""
    return min(capacity, -(-(needed + needed // 4 + 1) // ALLOCATION_STEP) * ALLOCATION_STEP)


class KVCache:
    """K/V buffers of one model (target or draft) for one batch of requests."""

    def __init__(self, memory: Memory, *, layers: int, batch: int, heads: int, capacity: int,
                 head_dim: int, dtype: np.dtype = np.float32) -> None:
        self.memory = memory
        self.capacity = capacity
        shape = (batch, heads, allocation(0, capacity), head_dim)
        self.keys = [memory.empty(shape, dtype) for _ in range(layers)]
        self.values = [memory.empty(shape, dtype) for _ in range(layers)]
        self.lengths = np.zeros(batch, dtype=np.int64)
        # Zero-length buffers for prefill: nothing to attend to, and no work spent masking S.
        empty_shape = (batch, heads, 0, head_dim)
        self._empty = memory.empty(empty_shape, dtype)

    @classmethod
    def for_graph(cls, runner: Any, *, batch: int, capacity: int) -> KVCache:
        """Buffers shaped after a graph's `past_key_*` inputs, in the runner's memory."""
        layers = sum(1 for name in runner.input_names if name.startswith("past_key_"))
        _, heads, _, head_dim = runner.input_shapes["past_key_0"]
        return cls(runner.memory, layers=layers, batch=batch, heads=int(heads),
                   capacity=capacity, head_dim=int(head_dim),
                   dtype=runner.input_dtypes["past_key_0"])

    def feeds(self, lo: int, hi: int, *, empty: bool = False) -> dict[str, Any]:
        """`past_key_i` / `past_value_i` inputs for rows lo:hi, as views of the buffers."""
        feeds: dict[str, Any] = {}
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if empty:
                k = v = self._empty
            feeds[f"past_key_{i}"] = self.memory.rows(k, lo, hi)
            feeds[f"past_value_{i}"] = self.memory.rows(v, lo, hi)
        return feeds

    def commit(self, outputs: Mapping[str, Any], counts: np.ndarray, lo: int = 0) -> None:
        """Append the first `counts[b]` new positions of each row (rows lo:lo+len(counts)).

        `outputs` holds `present_key_i` / `present_value_i` [rows, H, T, D] of the last run.
        """
        hi = lo + len(counts)
        ends = self.lengths[lo:hi] + counts
        if np.any(ends > self.capacity):
            raise ValueError(f"KV cache overflow: capacity {self.capacity}, "
                             f"lengths {self.lengths[lo:hi]} + {counts}")
        if int(ends.max(initial=0)) > self.allocated:
            self._resize(allocation(int(ends.max()), self.capacity))
        rows = self.memory.rows
        caches = [rows(b, lo, hi) for kv in zip(self.keys, self.values) for b in kv]
        presents = [outputs[f"present_{kind}_{i}"] for i in range(len(self.keys))
                    for kind in ("key", "value")]
        self.memory.commit(caches, presents, self.lengths[lo:hi], counts)
        self.memory.synchronize()
        self.lengths[lo:hi] += counts

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Row `dst` takes row `src`'s first n positions (a shared prompt prefix) as its own."""
        if n > self.allocated:
            raise ValueError(f"row {src} holds {self.allocated} positions, not {n}")
        if src != dst:  # a slot reusing what its own last request left copies nothing
            for buffer in self.keys + self.values:
                self.memory.copy_prefix(buffer, src, dst, n)
            self.memory.synchronize()
        self.lengths[dst] = n

    @property
    def allocated(self) -> int:
        """Positions the buffers hold now (S of every feed), at most `capacity`."""
        return int(self.keys[0].shape[2])

    def fit(self) -> None:
        """Shrink the buffers when the longest row needs less than half of them (call after
        rows have been cleared: their `lengths` set to 0)."""
        wanted = allocation(int(self.lengths.max(initial=0)), self.capacity)
        if 2 * wanted <= self.allocated:
            self._resize(wanted)

    def _resize(self, length: int) -> None:
        resized = self.memory.resized
        self.keys = [resized(k, length) for k in self.keys]
        self.values = [resized(v, length) for v in self.values]
        self.memory.synchronize()

"""SPS(B): measure the target's verify steps per second at a few verify batch sizes.

The hardware-aware scheduler needs the cost of verifying B tokens on *this* engine and GPU, so
the build times real target verify steps: `rows` requests of up to gamma+1 new tokens each
(B = total tokens, the last row padded like the runtime pads it), a full KV buffer of a
realistic past length, random ids. Points are spaced geometrically from 1 to
max_batch * (gamma + 1); each is the median of `repeats` timed runs after a warm-up.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from dspark_runtime.backends.base import Runner
from dspark_runtime.sps import SPSTable

_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.float32}  # bf16 travels as f32
_DEFAULT_PAST = 512
_WARMUP = 2


def default_token_counts(max_tokens: int, points: int = 8) -> list[int]:
    """About `points` geometrically spaced integers from 1 to `max_tokens`, both included."""
    if max_tokens <= 1:
        return [1]
    raw = np.geomspace(1, max_tokens, num=min(points, max_tokens))
    return sorted({int(round(x)) for x in raw} | {1, max_tokens})


def verify_feeds(shapes: Mapping[str, Any], tokens: int, past: int, rng: np.random.Generator,
                 precision: str = "fp32") -> dict[str, np.ndarray]:
    """target.onnx inputs for one verify step of `tokens` tokens (docs/graphs.md)."""
    step, target = int(shapes["gamma"]) + 1, shapes["target"]
    rows, width = math.ceil(tokens / step), min(tokens, step)
    new_lengths = np.full(rows, width, dtype=np.int64)
    new_lengths[-1] = tokens - width * (rows - 1)
    kv_shape = (rows, int(target["num_kv_heads"]), past, int(target["head_dim"]))
    kv_dtype = _DTYPES[precision]
    feeds = {
        "input_ids": rng.integers(0, int(target["vocab_size"]), (rows, width), dtype=np.int64),
        "position_ids": past + np.tile(np.arange(width, dtype=np.int64), (rows, 1)),
        "past_lengths": np.full(rows, past, dtype=np.int64),
        "new_lengths": new_lengths,
    }
    for i in range(int(target["num_layers"])):
        for kind in ("key", "value"):
            # Contents do not change the cost; a written constant (not lazily zeroed pages,
            # which all map to one physical page) makes every read touch real memory.
            feeds[f"past_{kind}_{i}"] = np.full(kv_shape, 0.01, dtype=kv_dtype)
    return feeds


def _time(runner: Runner, feeds: dict[str, np.ndarray], repeats: int) -> list[float]:
    """Seconds per step. A runner whose inputs can stay on the device (TensorRT) times the
    engine alone, as the runtime runs it with device-resident caches; others time `infer`."""
    device_timer = getattr(runner, "time_infer", None)
    if device_timer is not None:
        return device_timer(feeds, repeats)
    for _ in range(_WARMUP):
        runner.infer(feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.infer(feeds)
        times.append(time.perf_counter() - start)
    return times


def measure_sps(target_runner: Runner, shapes: Mapping[str, Any],
                token_counts: Sequence[int] | None = None, repeats: int = 5, *,
                past_length: int | None = None, precision: str = "fp32", device: str = "",
                backend: str = "", seed: int = 0,
                on_point: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Time target verify steps; returns the `sps_table.json` payload (see dspark_runtime.sps).

    `shapes` is a manifest's `shapes`: gamma, max_batch, max_context and `target` (num_layers,
    num_kv_heads, head_dim, vocab_size); `precision` sets the KV cache dtype; `on_point` is
    called with each token count once it is measured.
    """
    step = int(shapes["gamma"]) + 1
    counts = sorted(set(token_counts or default_token_counts(int(shapes["max_batch"]) * step)))
    past = past_length if past_length is not None else min(
        _DEFAULT_PAST, int(shapes["max_context"]) - step)
    if past < 0:
        raise ValueError(f"past length {past} leaves no room in max_context "
                         f"{shapes['max_context']} for a verify step of {step} tokens")
    rng = np.random.default_rng(seed)
    medians = []
    for tokens in counts:
        feeds = verify_feeds(shapes, tokens, past, rng, precision)
        times = _time(target_runner, feeds, max(1, repeats))
        medians.append(float(np.median(times)) * 1000.0)
        if on_point:
            on_point(tokens)
    table = SPSTable(counts, [1000.0 / ms for ms in medians], medians, device=device,
                     backend=backend)
    return {**table.to_json(), "past_length": past, "gamma": step - 1}

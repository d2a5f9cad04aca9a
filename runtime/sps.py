"""SPS(B): the engine's measured verify steps per second at a verify batch of B tokens.

The hardware-aware scheduler trades expected accepted tokens against the cost of a bigger verify
batch, and that cost is a property of one engine on one GPU. So it is profiled once at build
time and shipped in the bundle as `sps_table.json`:

    {"version": 1, "device": "NVIDIA H100 80GB HBM3", "backend": "tensorrt",
     "points": [{"tokens": 1, "steps_per_s": 812.3, "median_ms": 1.231}, ...]}

`tokens` is the total verify batch in tokens (sum over rows of 1 + verify length), strictly
increasing; `steps_per_s` the measured verify forward passes per second at that batch;
`median_ms` the median step time the rate came from (kept for reports, not used here).

Between measured points the rate is interpolated linearly. Below the first point it is clamped
to the first rate (a smaller batch is never assumed slower than the smallest one measured).
Above the last point the *step time* grows linearly with the marginal cost per token of the last
two points (floored at zero), i.e. the engine is assumed to stay in the regime it was last seen
in; with a single point the rate is constant.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPS_TABLE_VERSION = 1
SPS_TABLE_FILENAME = "sps_table.json"


@dataclass(frozen=True)
class SPSTable:
    """Measured verify throughput curve of one engine (see the module docstring)."""

    batch_tokens: list[int]
    steps_per_s: list[float]
    median_ms: list[float] = field(default_factory=list)
    device: str = ""
    backend: str = ""

    def __post_init__(self) -> None:
        ms = list(self.median_ms)
        _validate_columns(list(self.batch_tokens), list(self.steps_per_s), ms or None, "SPSTable")
        object.__setattr__(self, "batch_tokens", [int(t) for t in self.batch_tokens])
        object.__setattr__(self, "steps_per_s", [float(s) for s in self.steps_per_s])
        object.__setattr__(self, "median_ms",
                           [float(m) for m in ms] or [1000.0 / s for s in self.steps_per_s])
        xs = np.asarray(self.batch_tokens, dtype=np.float64)
        ys = np.asarray(self.steps_per_s, dtype=np.float64)
        # Step-time slope (seconds per extra token) past the last point, floored at zero.
        slope = max(0.0, (1 / ys[-1] - 1 / ys[-2]) / (xs[-1] - xs[-2])) if len(xs) > 1 else 0.0
        object.__setattr__(self, "_curve", (xs, ys, slope))

    def __call__(self, tokens: float | np.ndarray) -> float | np.ndarray:
        """Steps/s at `tokens` verify tokens (scalar in, float out; array in, array out)."""
        xs, ys, slope = self._curve
        x = np.asarray(tokens, dtype=np.float64)
        out = np.interp(x, xs, ys)  # clamps to ys[0] below the first point
        beyond = x > xs[-1]
        if np.any(beyond):
            out = np.where(beyond, 1.0 / (1.0 / ys[-1] + slope * (np.maximum(x, xs[-1]) - xs[-1])),
                           out)
        return float(out) if out.ndim == 0 else out

    def to_json(self) -> dict:
        return {
            "version": SPS_TABLE_VERSION,
            "device": self.device,
            "backend": self.backend,
            "points": [{"tokens": int(t), "steps_per_s": float(s), "median_ms": float(m)}
                       for t, s, m in zip(self.batch_tokens, self.steps_per_s, self.median_ms)],
        }

    @classmethod
    def from_json(cls, data: object, source: str = "sps_table.json") -> SPSTable:
        """Build from parsed JSON; every error names `source` and the offending field."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if type(data.get("version")) is not int or data["version"] != SPS_TABLE_VERSION:
            raise ValueError(f"{source}: 'version' must be {SPS_TABLE_VERSION}, "
                             f"got {data.get('version')!r}")
        for key in ("device", "backend"):
            if not isinstance(data.get(key), str):
                raise ValueError(f"{source}: '{key}' must be a string, got {data.get(key)!r}")
        points = data.get("points")
        if not isinstance(points, list):
            raise ValueError(f"{source}: 'points' must be a list, got {points!r}")
        cols: dict[str, list] = {"tokens": [], "steps_per_s": [], "median_ms": []}
        for i, p in enumerate(points):
            if not isinstance(p, dict):
                raise ValueError(f"{source}: points[{i}] must be an object, got {p!r}")
            for key, col in cols.items():
                if key not in p:
                    raise ValueError(f"{source}: points[{i}] has no '{key}'")
                col.append(p[key])
        _validate_columns(cols["tokens"], cols["steps_per_s"], cols["median_ms"], source)
        return cls(cols["tokens"], cols["steps_per_s"], cols["median_ms"],
                   device=data["device"], backend=data["backend"])

    @classmethod
    def load(cls, path: str | os.PathLike) -> SPSTable:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_json(data, source=str(path))

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically, so an interrupted build never leaves half a table behind."""
        write_json_atomic(Path(path), self.to_json())


def _validate_columns(tokens: list, rates: list, ms: list | None, source: str) -> None:
    if len(tokens) == 0:
        raise ValueError(f"{source}: 'points' is empty; at least one measured batch is needed")
    if len(rates) != len(tokens) or (ms is not None and len(ms) != len(tokens)):
        raise ValueError(f"{source}: tokens, steps_per_s and median_ms differ in length")
    for i, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1:
            raise ValueError(f"{source}: points[{i}].tokens must be an integer >= 1, got {t!r}")
        if i and t <= tokens[i - 1]:
            raise ValueError(f"{source}: points[{i}].tokens must be strictly increasing "
                             f"({tokens[i - 1]} then {t})")
    for name, values in (("steps_per_s", rates), ("median_ms", ms or [])):
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{source}: points[{i}].{name} must be a positive finite number, "
                                 f"got {v!r}")


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON through a temporary file and a rename: readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, allow_nan=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

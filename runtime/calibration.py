"""Sequential Temperature Scaling (STS) of the confidence head, and its metrics.

The hardware-aware scheduler uses the absolute value of the prefix survival
a_j = prod_{i<=j} c_i, not just its ranking, so the raw (overconfident) head is calibrated once
on held-out drafts. STS fits one temperature per position on the confidence logit,
c_j = sigmoid(z_j / T_j), left to right: T_k minimises the ECE of the cumulative product at
position k with T_1..T_{k-1} already fixed (paper section 3.2.1). The labels are DeepSpec's
accepted-prefix mask: at a verified position k, 1 if drafts 1..k all survived, else 0.

Metrics follow DeepSpec's per-position report: ECE over equal-width bins and ROC AUC, both of
the cumulative product against the prefix label. Temperature scaling keeps the ranking of each
per-step c_j, hence the AUC at position 1; at later positions the product of differently
scaled factors can reorder samples, so the AUC there may move slightly.

`calibration.json` (in the bundle):

    {"version": 1, "method": "sts", "temperatures": [T_1, ..., T_G], "grid": [...],
     "n_samples": N, "metrics": <calibration_report(...)>}
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .sps import write_json_atomic

CALIBRATION_VERSION = 1
CALIBRATION_FILENAME = "calibration.json"
DEFAULT_BINS = 20
# Log-spaced, symmetric around 1 (index 100 is exactly 1.0): over- and under-confidence alike.
DEFAULT_GRID = np.geomspace(0.1, 10.0, 201)
_MAX_CHUNK = 1 << 22  # grid x samples evaluated at once, bounds memory on big validation sets


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Overflow-free logistic function."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def apply_sts(confidence_logits: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """Per-step calibrated confidences c_j = sigmoid(z_j / T_j); logits are [..., G]."""
    z = np.asarray(confidence_logits, dtype=np.float64)
    t = _check_temperatures(temperatures)
    if z.shape[-1:] != t.shape:
        raise ValueError(f"confidence logits have {z.shape[-1:]} positions but there are "
                         f"{len(t)} temperatures")
    return sigmoid(z / t)


def ece(pred: np.ndarray, target: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error over equal-width bins of [0, 1] (NaN when empty)."""
    p = np.asarray(pred, dtype=np.float64).ravel()
    return float(_ece_rows(p[None], np.asarray(target, dtype=np.float64).ravel(), bins)[0])


def auc(pred: np.ndarray, target: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U with average ranks for ties); NaN without both classes."""
    p = np.asarray(pred, dtype=np.float64).ravel()
    y = np.asarray(target).ravel().astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    ranks = (starts + (counts + 1) / 2.0)[inverse]  # 1-based average rank per value
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def fit_sts(confidence_logits: np.ndarray, accepted_prefix_mask: np.ndarray,
            grid: np.ndarray = DEFAULT_GRID, *, valid: np.ndarray | None = None,
            bins: int = DEFAULT_BINS) -> np.ndarray:
    """Temperatures [G] fitted left to right by grid search on the ECE of the cumulative product.

    `accepted_prefix_mask[n, j]` is 1 where position j was verified and drafts 1..j survived, 0
    where it was verified and the prefix failed, and NaN (or False in `valid`) where it was not
    verified. A position without verified samples keeps T = 1; ties go to the earlier grid value.
    """
    z, labels, ok = _check_samples(confidence_logits, accepted_prefix_mask, valid)
    grid = _check_temperatures(grid, what="grid")
    temperatures = np.ones(z.shape[1])
    prefix = np.ones(z.shape[0])
    for k in range(z.shape[1]):
        rows = ok[:, k]
        if rows.any():
            zk, base, yk = z[rows, k], prefix[rows], labels[rows, k]
            errors = np.concatenate([
                _ece_rows(base * sigmoid(zk / chunk[:, None]), yk, bins)
                for chunk in np.array_split(grid, _n_chunks(grid.size, int(rows.sum())))
            ])
            temperatures[k] = grid[int(np.argmin(errors))]
        prefix = prefix * sigmoid(z[:, k] / temperatures[k])
    return temperatures


def calibration_report(confidence_logits: np.ndarray, accepted_prefix_mask: np.ndarray,
                       temperatures: np.ndarray, *, valid: np.ndarray | None = None,
                       bins: int = DEFAULT_BINS) -> dict:
    """Per-position (1-based) sample count, ECE and AUC of the cumulative product, before
    (raw sigmoid) and after STS, plus their means weighted by sample count. JSON-ready:
    undefined values are None."""
    z, labels, ok = _check_samples(confidence_logits, accepted_prefix_mask, valid)
    before = np.cumprod(sigmoid(z), axis=1)
    after = np.cumprod(apply_sts(z, temperatures), axis=1)
    positions = []
    for k in range(z.shape[1]):
        rows = ok[:, k]
        y = labels[rows, k]
        positions.append({
            "position": k + 1,
            "n": int(rows.sum()),
            "ece_before": _json_float(ece(before[rows, k], y, bins)),
            "ece_after": _json_float(ece(after[rows, k], y, bins)),
            "auc_before": _json_float(auc(before[rows, k], y)),
            "auc_after": _json_float(auc(after[rows, k], y)),
        })
    mean = {}
    for key in ("ece_before", "ece_after", "auc_before", "auc_after"):
        pairs = [(p[key], p["n"]) for p in positions if p[key] is not None]
        weight = sum(n for _, n in pairs)
        mean[key] = sum(v * n for v, n in pairs) / weight if weight else None
    return {"bins": bins, "positions": positions, "mean": mean}


@dataclass(frozen=True)
class Calibration:
    """A fitted STS calibration, as stored in the bundle's calibration.json."""

    temperatures: list[float]
    grid: list[float]
    n_samples: int
    metrics: dict = field(default_factory=dict)
    method: str = "sts"

    @property
    def gamma(self) -> int:
        return len(self.temperatures)

    def apply(self, confidence_logits: np.ndarray) -> np.ndarray:
        """Calibrated per-step confidences for the scheduler."""
        return apply_sts(confidence_logits, np.asarray(self.temperatures))

    def to_json(self) -> dict:
        return {"version": CALIBRATION_VERSION, "method": self.method,
                "temperatures": [float(t) for t in self.temperatures],
                "grid": [float(g) for g in self.grid], "n_samples": int(self.n_samples),
                "metrics": self.metrics}

    @classmethod
    def from_json(cls, data: object, source: str = CALIBRATION_FILENAME,
                  gamma: int | None = None) -> Calibration:
        """Validate parsed JSON; errors name `source` and the field. `gamma` checks the length."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if type(data.get("version")) is not int or data["version"] != CALIBRATION_VERSION:
            raise ValueError(f"{source}: 'version' must be {CALIBRATION_VERSION}, "
                             f"got {data.get('version')!r}")
        if data.get("method") != "sts":
            raise ValueError(f"{source}: 'method' must be 'sts', got {data.get('method')!r}")
        for key in ("temperatures", "grid"):
            values = data.get(key)
            if not isinstance(values, list) or not values or not all(
                    _is_number(v) and math.isfinite(v) and v > 0 for v in values):
                raise ValueError(f"{source}: '{key}' must be a non-empty list of positive "
                                 f"finite numbers, got {values!r}")
        if gamma is not None and len(data["temperatures"]) != gamma:
            raise ValueError(f"{source}: 'temperatures' has {len(data['temperatures'])} entries "
                             f"but the drafter's block size (gamma) is {gamma}")
        n = data.get("n_samples")
        if type(n) is not int or n < 0:
            raise ValueError(f"{source}: 'n_samples' must be an integer >= 0, got {n!r}")
        if not isinstance(data.get("metrics"), dict):
            raise ValueError(f"{source}: 'metrics' must be an object, got {data.get('metrics')!r}")
        return cls([float(t) for t in data["temperatures"]], [float(g) for g in data["grid"]],
                   n, data["metrics"])

    @classmethod
    def load(cls, path: str | os.PathLike, gamma: int | None = None) -> Calibration:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_json(data, source=str(path), gamma=gamma)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file + rename)."""
        write_json_atomic(Path(path), self.to_json())


def fit_calibration(confidence_logits: np.ndarray, accepted_prefix_mask: np.ndarray,
                    grid: np.ndarray = DEFAULT_GRID, *, valid: np.ndarray | None = None,
                    bins: int = DEFAULT_BINS) -> Calibration:
    """Fit STS and record the before/after report: what the toolchain writes to the bundle."""
    temperatures = fit_sts(confidence_logits, accepted_prefix_mask, grid, valid=valid, bins=bins)
    _, _, ok = _check_samples(confidence_logits, accepted_prefix_mask, valid)
    report = calibration_report(confidence_logits, accepted_prefix_mask, temperatures,
                                valid=valid, bins=bins)
    return Calibration([float(t) for t in temperatures], [float(g) for g in np.ravel(grid)],
                       int(ok.any(axis=1).sum()), report)


def _ece_rows(pred: np.ndarray, target: np.ndarray, bins: int) -> np.ndarray:
    """ECE of each row of pred [M, n] against one target [n], in one bincount."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    m, n = pred.shape
    if target.shape != (n,):
        raise ValueError(f"pred and target differ in shape: {pred.shape[1:]} vs {target.shape}")
    if n == 0:
        return np.full(m, math.nan)
    idx = np.clip((np.clip(pred, 0.0, 1.0) * bins).astype(np.int64), 0, bins - 1)
    flat = (idx + bins * np.arange(m)[:, None]).ravel()
    # Per bin, weight * |mean pred - mean target| == |sum pred - sum target|.
    gap = (np.bincount(flat, weights=pred.ravel(), minlength=m * bins)
           - np.bincount(flat, weights=np.broadcast_to(target, pred.shape).ravel(),
                         minlength=m * bins))
    return np.abs(gap).reshape(m, bins).sum(axis=1) / n


def _n_chunks(n_grid: int, n_samples: int) -> int:
    return int(min(n_grid, max(1, n_grid * n_samples // _MAX_CHUNK)))


def _check_samples(logits: np.ndarray, mask: np.ndarray,
                   valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, labels, valid) as float/float/bool [N, G], with unverified entries zeroed."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(mask, dtype=np.float64)
    if z.ndim != 2 or y.shape != z.shape:
        raise ValueError(f"confidence_logits and accepted_prefix_mask must both be [N, G], "
                         f"got {z.shape} and {y.shape}")
    ok = ~np.isnan(y) if valid is None else np.asarray(valid, dtype=bool)
    if ok.shape != z.shape:
        raise ValueError(f"valid must be [N, G] like the logits, got {ok.shape}")
    if np.any(ok[:, 1:] & ~ok[:, :-1]):
        raise ValueError("verified positions must form a prefix of each block "
                         "(a position is verified only if the one before it was)")
    labels = np.where(ok, y, 0.0)
    if not np.all(np.isin(labels, (0.0, 1.0))):
        raise ValueError("accepted_prefix_mask must be 0 or 1 at verified positions")
    if np.any((labels[:, 1:] > labels[:, :-1]) & ok[:, 1:]):
        raise ValueError("accepted_prefix_mask must be a prefix label (1 only where every "
                         "earlier position is 1); per-step survival labels are not accepted")
    if not np.all(np.isfinite(z[ok])):
        raise ValueError("confidence_logits must be finite at verified positions")
    return np.where(ok, z, 0.0), labels, ok


def _check_temperatures(values: np.ndarray, what: str = "temperatures") -> np.ndarray:
    t = np.asarray(values, dtype=np.float64)
    if t.ndim != 1 or t.size == 0 or not np.all(np.isfinite(t) & (t > 0)):
        raise ValueError(f"{what} must be a non-empty 1-D array of positive finite numbers")
    return t


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else value

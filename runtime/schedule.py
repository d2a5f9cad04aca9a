"""Verify-length schedulers: how many draft tokens of each row the target verifies this step.

The runtime loop calls `verify_lengths(confidences, active)` once per step, after drafting and
before verification. `confidences[r, j-1]` is the calibrated per-step confidence c_{r,j} (the
probability that draft token j survives given that tokens < j did); the target then verifies
1 + l_r tokens of row r (the anchor plus l_r drafts). Finished rows get 0.

Losslessness constrains every scheduler here: whether draft token x_{r,k} is admitted
(l_r >= k) may depend on anything known before x_{r,k} was sampled, never on x_{r,k} itself.
c_{r,k+1} is computed from x_{r,k} (the Markov embedding), so a scheduler that looks at
a_{r,k+1} before committing to token k leaks it (paper, Appendix A). The biased variant that
does exactly that lives in the tests only.
"""
from __future__ import annotations

from collections import deque
from typing import Protocol

import numpy as np

from .sps import SPS_TABLE_FILENAME, SPSTable

SCHEDULER_NAMES = ("fixed", "threshold", "hardware", "async")
AUTO = "auto"
DEFAULT_THRESHOLD = 0.5


class Scheduler(Protocol):
    """What the runtime loop calls once per step."""

    name: str

    def verify_lengths(self, confidences: np.ndarray, active: np.ndarray) -> np.ndarray:
        """int64 [B] drafts to verify per row (0..G) from confidences [B, G] and active [B]."""

    def reset(self) -> None:
        """Forget per-generation state before a new batch of requests."""


def check_inputs(confidences: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shapes and ranges the schedulers rely on; finished rows may hold anything."""
    c = np.asarray(confidences, dtype=np.float64)
    act = np.asarray(active)
    if c.ndim != 2:
        raise ValueError(f"confidences must be [B, G], got shape {c.shape}")
    if act.shape != (c.shape[0],) or act.dtype != np.bool_:
        raise ValueError(f"active must be a bool array of shape ({c.shape[0]},), "
                         f"got {act.dtype} {act.shape}")
    live = c[act]
    if not np.all((live >= 0.0) & (live <= 1.0)):  # also rejects NaN
        raise ValueError("confidences of active rows must lie in [0, 1] (calibrated per-step c)")
    return np.where(act[:, None], c, 0.0), act


def prefix_survival(confidences: np.ndarray) -> np.ndarray:
    """a_{r,j} = prod_{i<=j} c_{r,i}: the probability that the first j drafts all survive."""
    return np.cumprod(confidences, axis=1)


def sorted_candidates(survival: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and survivals of all (r, j) with a_{r,j} > 0, best first.

    Ties go to the smaller j (then the smaller r), so the admitted set of every row is always a
    prefix even where c = 1 makes a_{r,j} == a_{r,j+1}.
    """
    rows, cols = np.nonzero((survival > 0.0) & active[:, None])
    vals = survival[rows, cols]
    order = np.lexsort((rows, cols, -vals))
    return rows[order], vals[order]


def candidate_positions(rows: np.ndarray) -> np.ndarray:
    """The draft index j (1-based) of each sorted candidate: admitted sets are prefixes, so it
    is one more than the number of the row's candidates sorted before it."""
    order = np.argsort(rows, kind="stable")
    ranked = rows[order]
    positions = np.empty(len(rows), dtype=np.int64)
    positions[order] = np.arange(len(rows)) - np.searchsorted(ranked, ranked) + 1
    return positions


def expected_throughput(survivals: np.ndarray, n_active: int, sps: SPSTable,
                        positions: np.ndarray | None = None) -> np.ndarray:
    """Theta_k = tau_k * SPS(B_k) after admitting the first k sorted candidates, k = 0..M.

    B_k = n_active + k (the paper: ragged verification), or, given the candidates'
    `positions`, n_active * (1 + the longest admitted row): what a verify batch padded to its
    longest row costs, as this runtime's graphs run it.
    """
    tau = n_active + np.concatenate(([0.0], np.cumsum(survivals)))
    if positions is None:
        tokens = n_active + np.arange(len(survivals) + 1)
    else:
        tokens = n_active * (1 + np.maximum.accumulate(np.concatenate(([0], positions))))
    return tau * sps(tokens)


def lengths_from_admitted(rows: np.ndarray, batch: int) -> np.ndarray:
    """Per-row verify lengths from admitted candidate rows (admitted sets are prefixes)."""
    return np.bincount(rows, minlength=batch).astype(np.int64)


class FixedScheduler:
    """Verify the same number of drafts in every active row (plain DFlash / fixed gamma)."""

    name = "fixed"

    def __init__(self, length: int) -> None:
        if length < 0:
            raise ValueError(f"fixed verify length must be >= 0, got {length}")
        self.length = int(length)

    def verify_lengths(self, confidences: np.ndarray, active: np.ndarray) -> np.ndarray:
        c, act = check_inputs(confidences, active)
        if self.length > c.shape[1]:
            raise ValueError(f"fixed verify length {self.length} exceeds the draft block "
                             f"G = {c.shape[1]}")
        return np.where(act, self.length, 0).astype(np.int64)

    def reset(self) -> None:
        pass


class ThresholdScheduler:
    """DeepSpec's static rule: verify up to the first position whose per-step c < threshold.

    Threshold 0 verifies the whole block. Unlike DeepSpec (raw sigmoid), the runtime hands
    in calibrated confidences, so a threshold means the same across drafters.
    """

    name = "threshold"

    def __init__(self, threshold: float) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"confidence threshold must lie in [0, 1], got {threshold}")
        self.threshold = float(threshold)

    def verify_lengths(self, confidences: np.ndarray, active: np.ndarray) -> np.ndarray:
        c, act = check_inputs(confidences, active)
        below = c < self.threshold  # never true for threshold 0: the whole block
        first_below = np.where(below.any(axis=1), below.argmax(axis=1), c.shape[1])
        return np.where(act, first_below, 0).astype(np.int64)

    def reset(self) -> None:
        pass


class HardwareScheduler:
    """Paper Algorithm 1: greedy admission by prefix survival, stopping at the first admission
    that does not raise Theta = tau * SPS(B).

    Theta is evaluated along the whole sorted path at once (vectorised), but the cut is the
    first non-improving step, so whether a candidate is admitted depends only on the candidates
    sorted before it, never on a_{r,j+1} of a token it is deciding about.
    """

    name = "hardware"

    def __init__(self, sps: SPSTable, *, padded: bool = False) -> None:
        """`padded`: cost a verify batch as padded to its longest row (`expected_throughput`)."""
        self.sps, self.padded = sps, padded

    def verify_lengths(self, confidences: np.ndarray, active: np.ndarray) -> np.ndarray:
        c, act = check_inputs(confidences, active)
        rows, vals = sorted_candidates(prefix_survival(c), act)
        return lengths_from_admitted(rows[:self.cutoff(vals, int(act.sum()), rows)], len(act))

    def cutoff(self, survivals: np.ndarray, n_active: int, rows: np.ndarray) -> int:
        """Number of sorted candidates admitted before the first non-improving admission."""
        positions = candidate_positions(rows) if self.padded else None
        theta = expected_throughput(survivals, n_active, self.sps, positions)
        improves = theta[1:] > theta[:-1]
        return len(survivals) if improves.all() else int(improves.argmin())

    def reset(self) -> None:
        pass


class AsyncScheduler:
    """Production variant (paper section 5.2): a full search for the budget K, made causal by
    running it on confidences from two steps earlier, then the top-K current candidates.

    Why it is lossless: K is a function of steps <= t-2 and of the current active set, all fixed
    before step t drafts anything. Given K, token (r, k) is admitted iff fewer than K current
    candidates sort before it; those are other rows' candidates (independent of row r's draws)
    and row r's positions < k (ties go to the smaller j, so positions > k never sort before
    it). So admission of x_{r,k} never depends on x_{r,k} or later tokens, and the full search
    may cross the jagged SPS cliffs that stop Algorithm 1. Conditioning on past randomness (old
    rejected drafts) does not bias the output: each step is lossless given the whole past.
    Until two steps of history exist it falls back to Algorithm 1 on the current confidences.
    """

    name = "async"
    lag = 2

    def __init__(self, sps: SPSTable, *, padded: bool = False) -> None:
        self.sps, self.padded = sps, padded
        self._fallback = HardwareScheduler(sps, padded=padded)
        self._history: deque[np.ndarray] = deque(maxlen=self.lag)

    def verify_lengths(self, confidences: np.ndarray, active: np.ndarray) -> np.ndarray:
        c, act = check_inputs(confidences, active)
        survival = prefix_survival(c)
        if self._history and self._history[0].shape != survival.shape:
            raise ValueError(f"batch shape changed from {self._history[0].shape} to "
                             f"{survival.shape} within a generation; call reset() first")
        rows, vals = sorted_candidates(survival, act)
        n_active = int(act.sum())
        if len(self._history) < self.lag:
            budget = self._fallback.cutoff(vals, n_active, rows)
        else:
            budget = self.budget(self._history[0], act)
        self._history.append(survival)
        return lengths_from_admitted(rows[:budget], len(act))

    def budget(self, old_survival: np.ndarray, active: np.ndarray) -> int:
        """K maximising Theta over the old candidates of rows still active (first maximum)."""
        old_rows, old_vals = sorted_candidates(old_survival, active)
        positions = candidate_positions(old_rows) if self.padded else None
        return int(np.argmax(expected_throughput(old_vals, int(active.sum()), self.sps,
                                                 positions)))

    def reset(self) -> None:
        self._history.clear()


def auto_schedule(sps: SPSTable | None) -> str:
    """What `auto` means for a bundle: the hardware-aware scheduler when it carries the SPS(B)
    table that scheduler needs (every `dspark-export build` measures one), else DeepSpec's
    static confidence threshold: on an export folder (reference pair, 6 prompts, CPU fp32) it
    ran at 0.97x target-only where verifying the full block every step ran at 0.85x."""
    return "hardware" if sps is not None else "threshold"


def make_scheduler(name: str, *, gamma: int, threshold: float = DEFAULT_THRESHOLD,
                   sps: SPSTable | None = None, length: int | None = None,
                   padded: bool = False) -> Scheduler:
    """Build a scheduler by its user-facing name (`auto`: `auto_schedule`); `length` (fixed
    only) defaults to gamma; `padded` (hardware, async): cost verify batches as padded to
    their longest row, as the runtime's graphs run them."""
    if gamma < 1:
        raise ValueError(f"gamma (the draft block size) must be >= 1, got {gamma}")
    if name == AUTO:
        name = auto_schedule(sps)
    if name == "fixed":
        length = gamma if length is None else length
        if not 0 <= length <= gamma:
            raise ValueError(f"fixed verify length must lie in 0..{gamma} (gamma), got {length}")
        return FixedScheduler(length)
    if name == "threshold":
        return ThresholdScheduler(threshold)
    if name in ("hardware", "async"):
        if sps is None:
            raise ValueError(f"scheduler '{name}' needs the engine's SPS(B) cost table, but the "
                             f"bundle has no {SPS_TABLE_FILENAME} (it was built without SPS "
                             "profiling); rebuild with profiling or use 'fixed' or 'threshold'")
        kind = HardwareScheduler if name == "hardware" else AsyncScheduler
        return kind(sps, padded=padded)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")

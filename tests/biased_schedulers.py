"""Deliberately biased schedulers, for tests that must be able to catch a lossy scheduler.

Never ship these as a user option: they break the output distribution (paper, Appendix A).
"""
from __future__ import annotations

import numpy as np

from dspark_runtime.schedule import (
    check_inputs, expected_throughput, lengths_from_admitted, prefix_survival, sorted_candidates,
)
from dspark_runtime.sps import SPSTable


class GlobalSearchScheduler:
    """Algorithm 1 without the early stop: the global maximum of Theta on the CURRENT
    confidences. Admitting x_{r,k} then depends on a_{r,k+1}, which depends on x_{r,k}."""

    name = "global-search-biased"

    def __init__(self, sps: SPSTable) -> None:
        self.sps = sps

    def verify_lengths(self, confidences: np.ndarray, active: np.ndarray) -> np.ndarray:
        c, act = check_inputs(confidences, active)
        rows, vals = sorted_candidates(prefix_survival(c), act)
        budget = int(np.argmax(expected_throughput(vals, int(act.sum()), self.sps)))
        return lengths_from_admitted(rows[:budget], len(act))

    def reset(self) -> None:
        pass

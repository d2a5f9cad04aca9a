"""Whether a speculative round should draft at all, or decode one target token per row.

A drafting round pays for the draft and Markov runs (and SpecVerify) whatever the scheduler then
verifies. Under load SPS(B) flattens, the hardware-aware scheduler verifies next to nothing, and
a round that drafted anyway is slower than a target-only one: served on 2 CPU threads, DSpark
fell to 0.5x target-only at 8 clients. So before drafting, the gate predicts the best a
drafting round can do: the scheduler's admission path over each row's confidences (a running
average over its past drafts), each step costed at SPS(B) of the padded verify batch plus the
measured cost of drafting at this window size. It drafts only when that beats one target token
per row at SPS(rows). Confidences are only as good as their calibration (a bundle may have none),
so the gate corrects them per draft position by what verification actually accepted: over all
requests, and per request as its own evidence comes in (a math prompt's drafts pass more often
than a chat prompt's). The scheduler then admits drafts by the corrected confidences too.

Lossless: the decision uses only earlier rounds (like the async scheduler's budget), never a
token of the round it decides about. A row's accepted tokens wait in the engine's
`PendingContext` until the next draft. When a row has waited `MAX_SKIPPED_ROUNDS` rounds, the
engine either drafts anyway, to refresh the evidence, if drafting came close to paying
(`EXPLORE`), or only takes the waiting context into the draft cache (one draft run, no
verification): under load, exploring rounds that cannot pay cost more than they tell.
"""
from __future__ import annotations

from collections import defaultdict, deque

import numpy as np

from .schedule import candidate_positions, prefix_survival, sorted_candidates
from .sps import SPSTable

MAX_SKIPPED_ROUNDS = 56
# A row's predicted confidences: a running average over its drafts, this weight on the newest
# (one round's confidences are a noisy predictor of the next round's).
CONFIDENCE_SMOOTHING = 0.5
# Drafting must promise this much more than target-only decoding: the SPS table was timed at
# build time, maybe under another load, and the one thing serving must never do is fall below
# target-only speed.
MIN_GAIN = 1.1
# A row that waited MAX_SKIPPED_ROUNDS drafts to refresh the evidence if drafting promised at
# least this fraction of target-only speed.
EXPLORE = 0.8
# The draft cost is the median of the last few drafting rounds at a window size: robust to a
# graph's first run at a new shape and to the catch-up draft after skipped rounds.
COST_WINDOW = 9
# Acceptance evidence decays by this factor a drafting round, so the correction follows the
# recent traffic; PRIOR_WEIGHT pseudo-observations keep it at 1 until evidence comes.
EVIDENCE_DECAY = 0.98
PRIOR_WEIGHT = 2.0


def pending_context_width(gamma: int) -> int:
    """Context positions a draft run may take at once in decode: one round's accepted tokens
    (at most gamma + 1) plus one per skipped round. TensorRT builds size the draft's decode
    optimization profile by it."""
    return gamma + 1 + MAX_SKIPPED_ROUNDS


class DraftGate:
    """Predicts from past rounds whether drafting pays this round (see the module doc)."""

    def __init__(self, sps: SPSTable, slots: int, gamma: int) -> None:
        self.sps = sps
        self.confidence = np.full((slots, gamma), np.nan)  # calibrated, averaged over drafts
        self.prior = np.full(gamma, np.nan)  # the same over every row: a new request's guess
        # per draft position, over rows that verification reached there: drafts accepted, and
        # the confidences that predicted them; over all requests and per slot
        self._accepted = np.zeros(gamma)
        self._predicted = np.zeros(gamma)
        self._slot_accepted = np.zeros((slots, gamma))
        self._slot_predicted = np.zeros((slots, gamma))
        self._costs: dict[int, deque[float]] = defaultdict(lambda: deque(maxlen=COST_WINDOW))
        self._cost: dict[int, float] = {}  # the median of each, kept up to date
        self.drafted = self.skipped = 0
        # promise() of a window until the evidence changes: skipped rounds (most, under load)
        # do not pay for the prediction again
        self._promised: dict[tuple[int, bytes], float] = {}

    def adopt(self, earlier: DraftGate) -> None:
        """Start from another engine's evidence over all requests (the prior confidences, the
        acceptance correction, the drafting costs): `Pipeline.generate` runs one engine a
        call, and a batch of one should not re-learn in every call what drafting costs and
        how often it pays. Per-request evidence starts afresh."""
        if earlier.confidence.shape[1] != self.confidence.shape[1] or earlier.sps is not self.sps:
            return
        self.prior = earlier.prior.copy()
        self._accepted, self._predicted = earlier._accepted.copy(), earlier._predicted.copy()
        for rows, costs in earlier._costs.items():
            self._costs[rows] = deque(costs, maxlen=COST_WINDOW)
        self._cost = dict(earlier._cost)

    def forget(self, slot: int) -> None:
        """A new request in `slot`: its confidences are guessed from the others' until it
        drafts."""
        self.confidence[slot] = np.nan
        self._slot_accepted[slot] = self._slot_predicted[slot] = 0.0
        self._promised.clear()

    def observe(self, lo: int, active: np.ndarray, confidence: np.ndarray, verified: np.ndarray,
                accepted: np.ndarray, seconds: float) -> None:
        """A drafting round over rows lo:lo+len(active): calibrated confidences [rows, G], drafts
        verified and accepted per row, and the seconds it spent beyond the target run."""
        rows = np.flatnonzero(active)
        old, new = self.confidence[lo + rows], confidence[rows]
        self.confidence[lo + rows] = _average(old, new)
        if len(rows):
            self.prior = _average(self.prior, new.mean(axis=0))
        # Draft k of a row was decided on iff k <= verified and every draft before it passed.
        k = np.arange(1, confidence.shape[1] + 1)
        reached = (k <= verified[rows, None]) & (k <= accepted[rows, None] + 1)
        passed = (reached & (k <= accepted[rows, None])).astype(np.float64)
        predicted = np.where(reached, new, 0.0)
        self._accepted = EVIDENCE_DECAY * self._accepted + passed.sum(axis=0)
        self._predicted = EVIDENCE_DECAY * self._predicted + predicted.sum(axis=0)
        slots = lo + rows
        self._slot_accepted[slots] = EVIDENCE_DECAY * self._slot_accepted[slots] + passed
        self._slot_predicted[slots] = EVIDENCE_DECAY * self._slot_predicted[slots] + predicted
        costs = self._costs[len(active)]
        costs.append(seconds)
        self._cost[len(active)] = float(np.median(costs))
        self._promised.clear()

    def correction(self, slots: np.ndarray | None = None) -> np.ndarray:
        """Per draft position, accepted / predicted drafts over all requests (1 without
        evidence; positions past the deepest one verified take the correction of the one
        before), or per slot in `slots` [n, G], each slot's evidence over that as a prior."""
        ratio = (self._accepted + PRIOR_WEIGHT) / (self._predicted + PRIOR_WEIGHT)
        seen = self._predicted > 0
        deepest = np.flatnonzero(seen)
        if len(deepest) and deepest[-1] + 1 < len(ratio):
            ratio[deepest[-1] + 1:] = ratio[deepest[-1]]
        if slots is None:
            return ratio
        return ((self._slot_accepted[slots] + PRIOR_WEIGHT * ratio)
                / (self._slot_predicted[slots] + PRIOR_WEIGHT))

    def corrected(self, slots: np.ndarray, confidence: np.ndarray) -> np.ndarray:
        """Confidences [n, G] of `slots` times their correction, within [0, 1]: what the
        scheduler admits drafts by, as well as the gate's prediction."""
        return np.clip(confidence * self.correction(slots), 0.0, 1.0)

    def draft_seconds(self, rows: int) -> float | None:
        """What drafting costs over a window of `rows` rows: the median of its last rounds;
        for a window size not drafted yet, interpolated between the sizes measured, or beyond
        them the nearest one's (scaled by the rows, above: never an underestimate on a CPU,
        where the cost grows with the rows). None before any drafting round."""
        if rows in self._cost or not self._cost:
            return self._cost.get(rows)
        sizes = sorted(self._cost)
        costs = [self._cost[n] for n in sizes]
        if rows > sizes[-1]:
            return costs[-1] * rows / sizes[-1]
        return float(np.interp(rows, sizes, costs))

    def should_draft(self, lo: int, active: np.ndarray, *, context_full: bool = False) -> bool:
        """True to draft over rows lo:lo+len(active); counts the decision. `context_full`: a
        row cannot wait another round, so a near miss (`EXPLORE`) drafts too."""
        key = (lo, active.tobytes())
        promise = self._promised.get(key)
        if promise is None:
            promise = self._promised[key] = self.promise(lo, active)
        decision = promise > (EXPLORE if context_full else MIN_GAIN)
        if decision:
            self.drafted += 1
        else:
            self.skipped += 1
        return decision

    def promise(self, lo: int, active: np.ndarray) -> float:
        """Predicted tokens/s of the best drafting round over rows lo:lo+len(active), as a
        multiple of target-only decoding's; infinite while there is nothing to predict from
        (draft, and measure)."""
        rows = len(active)
        cost = self.draft_seconds(rows)
        slots = lo + np.flatnonzero(active)
        confidence = self.confidence[slots]
        confidence = np.where(np.isnan(confidence), self.prior, confidence)
        if cost is None or np.isnan(confidence).any():
            return np.inf
        confidence = self.corrected(slots, confidence)
        n_active = len(confidence)
        candidates, survivals = sorted_candidates(prefix_survival(confidence),
                                                  np.ones(n_active, dtype=bool))
        tokens = n_active + np.concatenate(([0.0], np.cumsum(survivals)))
        # A verify batch is padded to its longest row, and holds at least one draft per row.
        longest = np.maximum.accumulate(np.concatenate(([1], candidate_positions(candidates))))
        seconds = cost + 1.0 / self.sps(rows * (1 + longest))
        target_only = n_active * self.sps(rows)
        return float(np.max(tokens / seconds) / target_only)


def _average(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Running average with weight CONFIDENCE_SMOOTHING on `new`; `new` where nothing is old."""
    return np.where(np.isnan(old), new, old + CONFIDENCE_SMOOTHING * (new - old))

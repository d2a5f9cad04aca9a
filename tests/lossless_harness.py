"""Statistical machinery for the losslessness tests (tests/test_lossless.py).

Two pieces:

* `chi_square_gof` / `stratified_chi_square`: Pearson goodness of fit with sparse bins merged,
  optionally stratified (one multinomial per stratum, e.g. per anchor token; the statistics and
  degrees of freedom add up).
* `ChainPair` + `simulate`: a fast synthetic speculative-decoding loop in numpy. The "target" is
  a first-order Markov chain p(y | previous token) over a handful of tokens, the "drafter"
  proposes a block of G tokens left to right from its own chain q(x_k | x_{k-1}) and reports a
  per-step confidence c_k = conf[x_{k-1}] that depends on the previous draft token, exactly the
  dependency that makes the Appendix-A search without early stop lossy (c_{k+1}, and hence the
  decision to verify x_k, is a function of x_k). Each round runs

      draft -> scheduler.verify_lengths(c, active) -> SpecVerify reference -> commit

  over a batch of B rows that share one scheduler (so batch-coupled schedulers see a real
  batch), and many independent generations run in lock step to amortise the Python overhead
  (each generation has its own scheduler instance, reset at its start).

Because the target is a Markov chain, the exact law of the tokens emitted after any point is
known in closed form given the token committed just before it: P(y1, y2 | a) = p[a, y1] p[y1, y2].
That is what lets the tests look at tokens emitted from round R >= 3 on (the async scheduler's
steady state): by the strong Markov property a lossless loop emits, after the anchor `a`
committed before round R, a continuation distributed as the target chain from `a`, whatever
happened before. So observations are stratified by that anchor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats

from dspark_plugins.spec_verify.reference import inverse_cdf_sample, spec_verify

MIN_EXPECTED = 5.0  # Pearson's rule of thumb: merge bins expected to hold fewer counts


@dataclass(frozen=True)
class ChiSquare:
    statistic: float
    dof: int
    pvalue: float
    bins: int

    def __str__(self) -> str:
        return f"chi2={self.statistic:.1f} dof={self.dof} bins={self.bins} p={self.pvalue:.3g}"


def _merged_terms(observed: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    """Pearson statistic and bin count after merging bins with expected < MIN_EXPECTED.

    Bins are merged smallest-expected first into one pooled bin until it reaches the floor;
    if the pooled bin still falls short it is folded into the smallest remaining bin.
    """
    order = np.argsort(expected, kind="stable")
    obs, exp = observed[order].astype(np.float64), expected[order].astype(np.float64)
    keep = exp >= MIN_EXPECTED
    small = np.nonzero(~keep)[0]
    o_bins, e_bins = list(obs[keep]), list(exp[keep])
    if len(small):
        o_pool, e_pool = obs[small].sum(), exp[small].sum()
        if e_pool > 0 and (e_pool >= MIN_EXPECTED or not e_bins):
            o_bins.append(o_pool)
            e_bins.append(e_pool)
        elif e_pool > 0 or o_pool > 0:
            # Fold the pool into the smallest kept bin (first after sorting).
            o_bins[0] += o_pool
            e_bins[0] += e_pool
    o_arr, e_arr = np.asarray(o_bins), np.asarray(e_bins)
    if np.any((e_arr == 0) & (o_arr > 0)):
        return float("inf"), len(o_arr)
    nz = e_arr > 0
    return float(((o_arr[nz] - e_arr[nz]) ** 2 / e_arr[nz]).sum()), int(nz.sum())


def stratified_chi_square(counts: np.ndarray, probs: np.ndarray) -> ChiSquare:
    """Goodness of fit of counts [S, K] to per-stratum probabilities probs [S, K].

    Each stratum s is a multinomial with n_s = counts[s].sum() trials; strata with no counts
    are skipped. Statistic and degrees of freedom are summed over strata (bins - 1 each).
    """
    counts = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    probs = np.atleast_2d(np.asarray(probs, dtype=np.float64))
    assert counts.shape == probs.shape, (counts.shape, probs.shape)
    total, dof, bins = 0.0, 0, 0
    for obs, p in zip(counts, probs):
        n = obs.sum()
        if n == 0:
            continue
        stat, k = _merged_terms(obs, p / p.sum() * n)
        total += stat
        dof += k - 1
        bins += k
    pvalue = float(stats.chi2.sf(total, dof)) if dof > 0 else 1.0
    return ChiSquare(total, dof, pvalue, bins)


def chi_square_gof(counts: np.ndarray, probs: np.ndarray) -> ChiSquare:
    """Unstratified goodness of fit (counts and probs flattened)."""
    return stratified_chi_square(np.ravel(counts)[None], np.ravel(probs)[None])


# --------------------------------------------------------------------------------------------
# Synthetic Markov target / drafter
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainPair:
    """Target chain p[a, y], draft chain q[a, x] and per-step confidence conf[x_prev].

    The drafter's k-th token is drawn from q[x_{k-1}] (x_0 = anchor) and reports
    c_k = conf[x_{k-1}], so c_{k+1} is a function of x_k.
    """

    p: np.ndarray
    q: np.ndarray
    conf: np.ndarray
    gamma: int

    @property
    def vocab(self) -> int:
        return self.p.shape[0]

    def joint2(self) -> np.ndarray:
        """Exact P(y1, y2 | anchor a) = p[a, y1] p[y1, y2], shape [V, V*V]."""
        return (self.p[:, :, None] * self.p[None, :, :]).reshape(self.vocab, -1)


@dataclass
class Observations:
    """Per sampled row: the anchor committed before round `start_round` and the next tokens."""

    anchors: np.ndarray  # [N]
    tokens: np.ndarray  # [N, n_tokens]
    verify_hist: np.ndarray  # histogram of verify lengths 0..G over all active row-rounds
    accepted_hist: np.ndarray  # histogram of accepted drafts

    def counts2(self, vocab: int) -> np.ndarray:
        """Counts [V, V*V] of (anchor, y1, y2)."""
        out = np.zeros((vocab, vocab * vocab))
        np.add.at(out, (self.anchors, self.tokens[:, 0] * vocab + self.tokens[:, 1]), 1)
        return out


Verifier = Callable[..., tuple[np.ndarray, np.ndarray]]


def simulate(pair: ChainPair, make_scheduler: Callable[[], object], *, generations: int,
             batch: int = 1, start_token: int = 0, start_round: int = 1, n_tokens: int = 2,
             seed: int = 0, verifier: Verifier = spec_verify,
             max_rounds: int = 200) -> Observations:
    """Run `generations` independent generations of `batch` rows each, in lock step.

    Every row starts with `start_token` committed (the anchor of round 1). A row is done, and
    turns inactive for its scheduler, once it has emitted `n_tokens` tokens in rounds
    >= `start_round`; the observation is (anchor committed before that round, those tokens).
    """
    rng = np.random.default_rng(seed)
    g = pair.gamma
    rows = generations * batch
    log_p = np.log(pair.p).astype(np.float32)
    q32 = pair.q.astype(np.float32)
    schedulers = [make_scheduler() for _ in range(generations)]
    for s in schedulers:
        s.reset()
    anchor = np.full(rows, start_token, dtype=np.int64)
    obs_anchor = np.full(rows, -1, dtype=np.int64)
    obs_tokens = np.full((rows, n_tokens), -1, dtype=np.int64)
    filled = np.zeros(rows, dtype=np.int64)
    active = np.ones(rows, dtype=bool)
    verify_hist = np.zeros(g + 1, dtype=np.int64)
    accepted_hist = np.zeros(g + 1, dtype=np.int64)
    for round_ in range(1, max_rounds + 1):
        if not active.any():
            break
        if round_ == start_round:
            obs_anchor[:] = anchor
        # Draft: x_k ~ q[x_{k-1}], c_k = conf[x_{k-1}] (vectorised over all rows).
        prev = anchor.copy()
        draft_ids = np.empty((rows, g), dtype=np.int64)
        conf = np.empty((rows, g), dtype=np.float64)
        u_draft = rng.random((rows, g), dtype=np.float32)
        for k in range(g):
            conf[:, k] = pair.conf[prev]
            prev = inverse_cdf_sample(q32[prev], u_draft[:, k])
            draft_ids[:, k] = prev
        # Schedule: one call per generation on its own batch of rows.
        lengths = np.zeros(rows, dtype=np.int64)
        for i, sched in enumerate(schedulers):
            sl = slice(i * batch, (i + 1) * batch)
            if active[sl].any():
                lengths[sl] = sched.verify_lengths(conf[sl], active[sl].copy())
        assert np.all(lengths[~active] == 0), "scheduler gave a finished row a verify length"
        # Verify the active rows with the SpecVerify reference semantics.
        idx = np.nonzero(active)[0]
        seq = np.concatenate([anchor[idx, None], draft_ids[idx]], axis=1)  # [n, G+1]
        accepted, tokens = verifier(
            log_p[seq], draft_ids[idx], q32[seq[:, :g]], lengths[idx],
            np.ones(len(idx), dtype=np.float32), rng.random((len(idx), g + 1), dtype=np.float32),
        )
        np.add.at(verify_hist, lengths[idx], 1)
        np.add.at(accepted_hist, accepted, 1)
        # Commit.
        for j, r in enumerate(idx):
            emitted = tokens[j, : accepted[j] + 1]
            anchor[r] = emitted[-1]
            if round_ >= start_round:
                take = min(n_tokens - filled[r], len(emitted))
                obs_tokens[r, filled[r]: filled[r] + take] = emitted[:take]
                filled[r] += take
                if filled[r] == n_tokens:
                    active[r] = False
    assert not active.any(), f"rows still running after {max_rounds} rounds"
    return Observations(obs_anchor, obs_tokens, verify_hist, accepted_hist)

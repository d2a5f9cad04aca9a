"""The draft gate: a speculative engine skips drafting where it would not pay, and stays lossless
(greedy tokens equal target-only) with the skipped rounds' context caught up at the next draft."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import export_tiny_pair

from dspark_runtime.draft_gate import (COST_WINDOW, MAX_SKIPPED_ROUNDS, DraftGate,
                                       pending_context_width)
from dspark_runtime.engine import Engine, Request
from dspark_runtime.schedule import make_scheduler
from dspark_runtime.sps import SPSTable

GAMMA = 4
NEW = 100  # tokens per request in the engine test: past one full wait of the pending context
FLAT = SPSTable([1, 64], [100.0, 100.0])  # verifying more costs nothing
# Up to 3 tokens cheap, then 100x: 2 or 3 rows cannot draft; 1 row can (2 or 3 tokens).
STEEP = SPSTable([1, 3, 4, 64], [100.0, 100.0, 1.0, 0.5])


def _observed(gate: DraftGate, confidence: float, seconds: float, rows: int = 2, *,
              verified: int = 0, accepted: int = 0) -> DraftGate:
    """One drafting round over rows 0..rows-1, every row alike."""
    active = np.ones(rows, dtype=bool)
    gamma = gate.confidence.shape[1]
    gate.observe(0, active, np.full((rows, gamma), confidence), np.full(rows, verified),
                 np.full(rows, accepted), seconds)
    return gate


def test_gate_drafts_until_it_has_measured_a_round_then_predicts():
    gate = DraftGate(STEEP, slots=3, gamma=GAMMA)
    assert gate.should_draft(0, np.ones(2, dtype=bool))  # no confidences, no cost yet
    _observed(gate, 0.9, 0.001)
    assert not gate.should_draft(0, np.ones(2, dtype=bool))
    assert not gate.should_draft(0, np.ones(3, dtype=bool))  # cost scaled from 2 rows
    assert gate.should_draft(0, np.ones(1, dtype=bool))  # one row: 2.7 tokens a step
    gate.forget(1)  # a new request in slot 1: guessed from the others, no draft needed
    assert not gate.should_draft(1, np.ones(2, dtype=bool))
    assert (gate.drafted, gate.skipped) == (2, 3)


def test_a_new_engines_gate_starts_from_the_last_ones_evidence():
    """Pipeline.generate runs one engine a call: the next call's gate knows what drafting
    cost and how often drafts passed, not the last requests' own confidences."""
    earlier = DraftGate(STEEP, slots=2, gamma=GAMMA)
    for _ in range(10):  # confident drafts that verification rejects
        _observed(earlier, 0.9, 0.001, verified=3, accepted=0)
    fresh = DraftGate(STEEP, slots=1, gamma=GAMMA)
    assert fresh.should_draft(0, np.ones(1, dtype=bool))  # nothing known: draft and measure
    fresh = DraftGate(STEEP, slots=1, gamma=GAMMA)
    fresh.adopt(earlier)
    np.testing.assert_array_equal(fresh.correction(), earlier.correction())
    assert fresh.draft_seconds(2) == earlier.draft_seconds(2)
    assert np.isnan(fresh.confidence).all() and not fresh._slot_predicted.any()
    # the prior confidences, corrected by the rejections: drafting does not pay
    assert not fresh.should_draft(0, np.ones(1, dtype=bool))
    other = DraftGate(FLAT, slots=1, gamma=GAMMA)
    other.adopt(earlier)  # another SPS table: another machine's evidence, not taken
    assert other.draft_seconds(2) is None


def test_gate_weighs_expected_tokens_against_the_cost_of_drafting():
    active = np.ones(2, dtype=bool)
    # Free verification: drafting pays when it is cheap against a target step (10 ms)...
    assert _observed(DraftGate(FLAT, 2, GAMMA), 0.9, 0.002).should_draft(0, active)
    # ...not when a draft costs 10 target steps, nor when drafts are never accepted.
    assert not _observed(DraftGate(FLAT, 2, GAMMA), 0.9, 0.1).should_draft(0, active)
    assert not _observed(DraftGate(FLAT, 2, GAMMA), 0.0, 0.002).should_draft(0, active)
    # Rows outside the active set do not count (row 1 has no confidences yet).
    gate = DraftGate(FLAT, 3, GAMMA)
    zeros = np.zeros(3, dtype=np.int64)
    gate.observe(0, np.array([True, False, True]), np.zeros((3, GAMMA)), zeros, zeros, 0.002)
    assert not gate.should_draft(0, np.array([True, False, True]))


def test_predicted_confidence_is_a_running_average_per_row():
    gate = _observed(DraftGate(FLAT, 2, GAMMA), 0.9, 0.002)
    _observed(gate, 0.1, 0.002)
    np.testing.assert_allclose(gate.confidence, 0.5)
    np.testing.assert_allclose(gate.prior, 0.5)
    gate.forget(0)
    assert np.isnan(gate.confidence[0]).all()


def test_drafting_must_promise_more_than_target_only():
    # 1 row, 1 draft: (1 + c) tokens in 2 target steps' time, so c = 1 would only break even.
    slow = SPSTable([1, 2], [100.0, 50.0])
    for c in (0.95, 1.0):
        assert not _observed(DraftGate(slow, 1, 1), c, 1e-9, rows=1).should_draft(
            0, np.ones(1, dtype=bool))
    gate = _observed(DraftGate(SPSTable([1, 2], [100.0, 80.0]), 1, 1), 0.9, 1e-9, rows=1)
    assert gate.should_draft(0, np.ones(1, dtype=bool))  # 1.9 tokens at 0.8 the rate: 1.52x


def test_a_row_that_cannot_wait_drafts_on_a_near_miss():
    # Drafts never accepted and free to make: drafting promises exactly target-only speed.
    gate = _observed(DraftGate(FLAT, 2, GAMMA), 0.0, 0.0)
    assert gate.promise(0, np.ones(2, dtype=bool)) == pytest.approx(1.0)
    assert not gate.should_draft(0, np.ones(2, dtype=bool))
    assert gate.should_draft(0, np.ones(2, dtype=bool), context_full=True)
    assert not _observed(DraftGate(FLAT, 2, GAMMA), 0.0, 0.01).should_draft(
        0, np.ones(2, dtype=bool), context_full=True)  # 0.5x: not worth exploring


def test_confidences_are_corrected_by_what_verification_accepted():
    gate = DraftGate(FLAT, 2, GAMMA)
    np.testing.assert_allclose(gate.correction(), 1.0)  # no evidence: trust the confidences
    for _ in range(30):  # confident 0.9, but of two drafts verified only the first passes
        _observed(gate, 0.9, 0.002, verified=2, accepted=1)
    ratio = gate.correction()
    assert ratio[0] == pytest.approx(1 / 0.9, rel=0.05)
    assert ratio[1] < 0.1
    assert ratio[2] == ratio[3] == ratio[1]  # never verified: as the deepest one verified
    # Each request's own evidence counts over the rest: slot 1's drafts start passing.
    for _ in range(30):
        gate.observe(0, np.array([False, True]), np.full((2, GAMMA), 0.9), np.array([0, 2]),
                     np.array([0, 2]), 0.002)
    per_slot = gate.correction(np.array([0, 1]))
    assert per_slot[0, 1] < gate.correction()[1] < per_slot[1, 1]
    assert per_slot[0, 1] < 0.1 < 0.5 < per_slot[1, 1]
    gate.forget(1)
    np.testing.assert_allclose(gate.correction(np.array([1]))[0], gate.correction())
    # Confident drafts that verification keeps rejecting stop being drafted.
    trusting, rejected = DraftGate(FLAT, 2, GAMMA), DraftGate(FLAT, 2, GAMMA)
    for _ in range(30):
        _observed(trusting, 0.9, 0.002)
        _observed(rejected, 0.9, 0.002, verified=1, accepted=0)
    assert trusting.should_draft(0, np.ones(2, dtype=bool))
    assert not rejected.should_draft(0, np.ones(2, dtype=bool))



def test_draft_cost_is_a_recent_median_per_window_size():
    gate = DraftGate(FLAT, 4, GAMMA)
    for seconds in (1.0, 0.002, 0.004, 0.003):  # a slow first run does not stick
        _observed(gate, 0.9, seconds)
    assert gate.draft_seconds(2) == pytest.approx(0.0035)
    assert DraftGate(FLAT, 3, GAMMA).draft_seconds(2) is None  # nothing measured
    # sizes not drafted yet: interpolated, or scaled from the nearest one measured
    _observed(gate, 0.9, 0.0005, rows=1)
    assert gate.draft_seconds(3) == pytest.approx(0.0035 * 3 / 2)
    _observed(gate, 0.9, 0.0095, rows=4)
    assert gate.draft_seconds(3) == pytest.approx(0.0065)
    assert gate.draft_seconds(1) == pytest.approx(0.0005)
    for _ in range(COST_WINDOW):
        _observed(gate, 0.9, 0.5)
    assert gate.draft_seconds(2) == pytest.approx(0.5)  # only the last rounds count


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from dspark_runtime.pipeline import Pipeline

    export: Path = export_tiny_pair(tmp_path_factory.getbasetemp())
    return Pipeline.from_bundle(export, schedule="fixed")


def _run(pipe, prompts: list[list[int]], max_new: int, *, sps: SPSTable | None, rounds: list):
    """The engine over `prompts` (slot i holds request i); the outputs, and each slot's draft
    cache (keys + values of its row, valid length) as it was when its request finished."""
    scheduler = make_scheduler("hardware", gamma=pipe.gamma, sps=sps, padded=True) if sps \
        else make_scheduler("fixed", gamma=pipe.gamma)
    outputs, draft_caches = {}, {}

    def finished(request_id, output):
        outputs[request_id] = output
        cache = engine.draft_kv
        draft_caches[request_id] = ([b[request_id].copy() for b in cache.keys + cache.values],
                                    int(cache.lengths[request_id]))

    engine = Engine(pipe, slots=len(prompts), capacity=NEW + 32, gamma=pipe.gamma,
                    scheduler=scheduler, on_round=rounds.append, on_finish=finished)
    ids = [engine.submit(Request(p, max_new)) for p in prompts]
    while engine.has_work():
        engine.step()
    return engine, [outputs[i] for i in ids], [draft_caches[i] for i in ids]


def test_skipped_rounds_stay_lossless_and_feed_the_next_draft(pipe):
    prompts = pipe.encode(["t5 t6 t7 t8 t9", "t20 t21"])
    want = pipe.generate(prompts, max_new_tokens=NEW, target_only=True).requests
    rounds: list = []
    gated, outs, gated_caches = _run(pipe, prompts, NEW, sps=STEEP, rounds=rounds)
    assert [o.token_ids for o in outs] == [w.token_ids for w in want]
    # The first round drafts (nothing measured); then the gate skips, and when a row's
    # waiting context is full it is taken into the draft cache in one draft run, no verify.
    assert [r.drafted for r in rounds] == [True] + [False] * (len(rounds) - 1)
    assert len(rounds) > pending_context_width(pipe.gamma)
    assert gated.context.width == pending_context_width(pipe.gamma)
    skipped = [r for r in rounds if not r.drafted]
    assert all(r.confidence_logits.shape == (len(r.request_ids), 0) for r in skipped)
    assert all(o.verified.count(0) >= MAX_SKIPPED_ROUNDS for o in outs)

    # The draft cache holds the same context K/V whether the target's features came one
    # round at a time or many rounds at once.
    _, _, always_caches = _run(pipe, prompts, NEW, sps=None, rounds=[])
    for (gated_rows, gated_length), (always_rows, always_length), prompt in zip(
            gated_caches, always_caches, prompts):
        n = min(gated_length, always_length)
        assert n >= len(prompt) + pending_context_width(pipe.gamma)
        for a, b in zip(gated_rows, always_rows):
            np.testing.assert_allclose(a[:, :n], b[:, :n], rtol=1e-4, atol=1e-5)

"""Verify-length schedulers and the SPS(B) table (pure numpy, fast)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from biased_schedulers import GlobalSearchScheduler
from dspark_runtime.schedule import (
    AsyncScheduler, FixedScheduler, HardwareScheduler, ThresholdScheduler, auto_schedule,
    candidate_positions, make_scheduler,
)
from dspark_runtime.sps import SPSTable

PROPERTY = settings(max_examples=150, deadline=None, derandomize=True)
APPENDIX_A = SPSTable([1, 2, 3], [1.0, 0.5, 0.45])  # the paper's two-token counterexample


def flat(max_tokens: int = 1024) -> SPSTable:
    return SPSTable([1, max_tokens], [100.0, 100.0])


def algorithm1(c: np.ndarray, active: np.ndarray, sps: SPSTable,
               padded: bool = False) -> np.ndarray:
    """Paper Algorithm 1 transcribed line by line, as an oracle for the vectorised version;
    `padded`: the verify batch costs n * (1 + the longest row) instead of n + admitted."""
    a = np.cumprod(c, axis=1)
    cands = [(-a[r, j], j, r) for r in range(len(c)) if active[r]
             for j in range(c.shape[1]) if a[r, j] > 0]
    cands.sort()
    n = int(active.sum())
    lengths, best = np.zeros(len(c), dtype=np.int64), np.zeros(len(c), dtype=np.int64)
    batch, tau = n, float(n)
    theta_best = n * sps(n)
    for neg_a, j, r in cands:
        lengths[r] = j + 1
        batch += 1
        tau += -neg_a
        theta = tau * sps(n * (1 + int(lengths.max())) if padded else batch)
        if theta > theta_best:
            theta_best, best = theta, lengths.copy()
        else:
            break
    return best


def theta(c: np.ndarray, active: np.ndarray, lengths: np.ndarray, sps: SPSTable) -> float:
    a = np.cumprod(c, axis=1)
    tau = sum(1 + a[r, :lengths[r]].sum() for r in range(len(c)) if active[r])
    return tau * sps(int(active.sum() + lengths.sum()))


def confidences(b: int, g: int) -> st.SearchStrategy[np.ndarray]:
    return st.lists(st.lists(st.floats(0.0, 1.0), min_size=g, max_size=g), min_size=b,
                    max_size=b).map(np.array)


batches = st.integers(1, 5).flatmap(lambda b: st.integers(1, 6).flatmap(lambda g: st.tuples(
    confidences(b, g),
    st.lists(st.booleans(), min_size=b, max_size=b).map(lambda x: np.array(x, dtype=bool)),
)))
decreasing = st.lists(st.floats(0.3, 1.0), min_size=36, max_size=36).map(np.cumprod)


# --- SPS table ---------------------------------------------------------------------------

def test_sps_interpolates_clamps_and_extrapolates():
    sps = SPSTable([2, 4, 8], [100.0, 80.0, 50.0])
    assert sps(1) == 100.0 and sps(2) == 100.0  # clamped below the first point
    assert sps(3) == pytest.approx(90.0) and sps(6) == pytest.approx(65.0)
    # Beyond 8: step time keeps the last marginal cost, (20 ms - 12.5 ms) / 4 tokens.
    assert 1.0 / sps(12) == pytest.approx(0.020 + 4 * 0.0075 / 4)
    np.testing.assert_allclose(sps(np.array([2, 3, 8])), [100.0, 90.0, 50.0])
    assert SPSTable([4], [70.0])(100) == 70.0  # one point: constant
    assert SPSTable([1, 2], [50.0, 60.0])(10) == 60.0  # a faster last point never extrapolates up


def test_sps_round_trip(tmp_path):
    sps = SPSTable([1, 8, 64], [500.0, 450.0, 120.0], [2.0, 2.2, 8.3], device="L4",
                   backend="onnxruntime")
    path = tmp_path / "sps_table.json"
    sps.save(path)
    raw = json.loads(path.read_text())
    assert raw == {"version": 1, "device": "L4", "backend": "onnxruntime", "points": [
        {"tokens": 1, "steps_per_s": 500.0, "median_ms": 2.0},
        {"tokens": 8, "steps_per_s": 450.0, "median_ms": 2.2},
        {"tokens": 64, "steps_per_s": 120.0, "median_ms": 8.3}]}
    assert SPSTable.load(path) == sps
    assert [p.name for p in tmp_path.iterdir()] == ["sps_table.json"]
    assert SPSTable([1, 2], [500.0, 250.0]).median_ms == [2.0, 4.0]


@pytest.mark.parametrize("edit, message", [
    ({"version": 2}, "'version' must be 1"),
    ({"device": None}, "'device' must be a string"),
    ({"points": []}, "'points' is empty"),
    ({"points": [{"tokens": 1, "steps_per_s": 9.0}]}, r"points\[0\] has no 'median_ms'"),
    ({"points": [{"tokens": 2, "steps_per_s": 9.0, "median_ms": 1.0},
                 {"tokens": 2, "steps_per_s": 8.0, "median_ms": 1.0}]},
     r"points\[1\]\.tokens must be strictly increasing"),
    ({"points": [{"tokens": 1.5, "steps_per_s": 9.0, "median_ms": 1.0}]},
     r"points\[0\]\.tokens must be an integer"),
    ({"points": [{"tokens": 1, "steps_per_s": 0.0, "median_ms": 1.0}]},
     r"points\[0\]\.steps_per_s must be a positive finite number"),
    ({"points": [{"tokens": 1, "steps_per_s": 3.0, "median_ms": "1"}]},
     r"points\[0\]\.median_ms must be a positive finite number"),
])
def test_bad_sps_table_names_file_and_field(tmp_path, edit, message):
    good = {"version": 1, "device": "cpu", "backend": "onnxruntime",
            "points": [{"tokens": 1, "steps_per_s": 9.0, "median_ms": 111.0}]}
    path = tmp_path / "sps_table.json"
    path.write_text(json.dumps({**good, **edit}))
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: {message}"):
        SPSTable.load(path)


# --- fixed and threshold -----------------------------------------------------------------

def test_fixed():
    c = np.full((3, 4), 0.5)
    active = np.array([True, False, True])
    assert FixedScheduler(3).verify_lengths(c, active).tolist() == [3, 0, 3]
    assert FixedScheduler(3).verify_lengths(c, active).dtype == np.int64
    with pytest.raises(ValueError, match="exceeds the draft block G = 4"):
        FixedScheduler(5).verify_lengths(c, active)


def test_threshold_matches_deepspec_semantics():
    c = np.array([[0.9, 0.4, 0.9], [0.9, 0.8, 0.7], [0.1, 0.9, 0.9], [0.5, 0.5, 0.49],
                  [0.0, 0.0, 0.0]])
    active = np.array([True, True, True, True, False])
    assert ThresholdScheduler(0.5).verify_lengths(c, active).tolist() == [1, 3, 0, 2, 0]
    assert ThresholdScheduler(0.0).verify_lengths(c, active).tolist() == [3, 3, 3, 3, 0]
    assert ThresholdScheduler(1.0).verify_lengths(c, active).tolist() == [0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ThresholdScheduler(1.5)


# --- hardware-aware (Algorithm 1) --------------------------------------------------------

def test_hardware_stops_at_first_non_improving_admission():
    """Appendix A: verifying both drafts gives the highest Theta (1.134 > 1.0), but admitting
    the first already lowers Theta (0.9), so Algorithm 1 must verify nothing."""
    c, active = np.array([[0.8, 0.9]]), np.array([True])
    assert theta(c, active, np.array([2]), APPENDIX_A) == pytest.approx(1.134)
    assert HardwareScheduler(APPENDIX_A).verify_lengths(c, active).tolist() == [0]
    assert GlobalSearchScheduler(APPENDIX_A).verify_lengths(c, active).tolist() == [2]
    # An admission that leaves Theta equal (2 * SPS(2) == 1 * SPS(1)) also stops the search.
    tie = SPSTable([1, 2, 3], [2.0, 1.0, 1.0])
    assert HardwareScheduler(tie).verify_lengths(np.ones((1, 2)), active).tolist() == [0]
    assert GlobalSearchScheduler(tie).verify_lengths(np.ones((1, 2)), active).tolist() == [2]


def test_global_search_is_anticipating_and_hardware_is_not():
    """The biased search admits x_1 only when x_1 makes c_2 high: the Appendix A leak."""
    active = np.array([True])
    high, low = np.array([[0.8, 0.9]]), np.array([[0.8, 0.0]])
    biased = GlobalSearchScheduler(APPENDIX_A)
    assert biased.verify_lengths(high, active)[0] >= 1 > biased.verify_lengths(low, active)[0]
    causal = HardwareScheduler(APPENDIX_A)
    assert causal.verify_lengths(high, active)[0] == causal.verify_lengths(low, active)[0]


def test_hardware_load_sensitivity_and_prefixes():
    c = np.array([[0.9, 0.9, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    active = np.array([True, True, False])
    # Free verification admits every draft with a nonzero survival (a = 0 is never admitted).
    assert HardwareScheduler(flat()).verify_lengths(c, active).tolist() == [2, 4, 0]
    steep = SPSTable([1, 2, 3], [100.0, 10.0, 1.0])
    assert HardwareScheduler(steep).verify_lengths(c, active).tolist() == [0, 0, 0]
    # Ties (c = 1) go to the smaller position, so a budget of 3 is still a prefix.
    budget3 = SPSTable([2, 5, 6], [100.0, 100.0, 1.0])
    assert HardwareScheduler(budget3).verify_lengths(c[1:2].repeat(2, 0),
                                                     np.array([True, True])).tolist() == [2, 1]


def test_hardware_with_no_active_rows():
    out = HardwareScheduler(flat()).verify_lengths(np.full((2, 3), np.nan), np.zeros(2, bool))
    assert out.tolist() == [0, 0] and out.dtype == np.int64


@PROPERTY
@given(batches, decreasing)
def test_hardware_matches_algorithm1_and_theta_rises_along_the_path(batch, rates):
    c, active = batch
    sps = SPSTable(list(range(1, 37)), list(rates * 1000.0))
    lengths = HardwareScheduler(sps).verify_lengths(c, active)
    np.testing.assert_array_equal(lengths, algorithm1(c, active, sps))
    assert np.all((lengths >= 0) & (lengths <= c.shape[1])) and np.all(lengths[~active] == 0)
    assert theta(c, active, lengths, sps) >= theta(c, active, np.zeros_like(lengths), sps)


@PROPERTY
@given(batches, decreasing)
def test_padded_hardware_matches_its_algorithm1(batch, rates):
    """Costed as the runtime pads verify rows; the same as the paper's for a single row."""
    c, active = batch
    sps = SPSTable(list(range(1, 37)), list(rates * 1000.0))
    padded = HardwareScheduler(sps, padded=True).verify_lengths(c, active)
    np.testing.assert_array_equal(padded, algorithm1(c, active, sps, padded=True))
    if active.sum() <= 1:
        np.testing.assert_array_equal(padded, HardwareScheduler(sps).verify_lengths(c, active))


def test_padding_shortens_a_lone_long_row():
    """One confident row and one doubtful: ragged costing verifies the confident row's whole
    block; padded costing sees that every row would pay for that width."""
    c = np.array([[0.99] * 6, [0.1] * 6])
    active = np.ones(2, dtype=bool)
    sps = SPSTable([1, 14], [100.0, 30.0])
    ragged = HardwareScheduler(sps).verify_lengths(c, active)
    padded = HardwareScheduler(sps, padded=True).verify_lengths(c, active)
    assert ragged.max() > padded.max() and (padded <= ragged).all()
    assert candidate_positions(np.array([1, 0, 1, 1, 0])).tolist() == [1, 1, 2, 3, 2]


@PROPERTY
@given(batches, decreasing, st.lists(st.floats(0.3, 1.0), min_size=36, max_size=36),
       st.integers(0, 3))
def test_steeper_sps_never_gives_a_longer_budget(batch, rates, extra_drop, stride):
    """SPS2 = SPS1 * g with g non-increasing is more load-sensitive: each admission must beat
    a larger cost ratio, so Algorithm 1 can only stop earlier. Holds for sparse tables too
    (linear interpolation keeps the ratio g monotone between points)."""
    c, active = batch
    tokens = list(range(1, 37))[::stride + 1]
    if tokens[-1] != 36:
        tokens.append(36)
    base = rates[np.array(tokens) - 1] * 1000.0
    g = np.cumprod(extra_drop)[np.array(tokens) - 1]
    loose = HardwareScheduler(SPSTable(tokens, list(base))).verify_lengths(c, active)
    steep = HardwareScheduler(SPSTable(tokens, list(base * g))).verify_lengths(c, active)
    assert steep.sum() <= loose.sum()
    assert np.all(steep <= loose)  # the steep path is a prefix of the loose one


@PROPERTY
@given(batches, decreasing, st.data())
def test_admission_never_depends_on_the_token_it_admits(batch, rates, data):
    """Non-anticipation: changing c_{r,k+1..G} (which x_{r,k} determines) must not change
    whether x_{r,k} is verified, for Algorithm 1 and for the async scheduler, ragged or
    padded."""
    for padded in (False, True):
        _check_non_anticipation(batch, rates, data, padded)


def _check_non_anticipation(batch, rates, data, padded: bool) -> None:
    c, active = batch
    r = data.draw(st.integers(0, len(c) - 1))
    k = data.draw(st.integers(1, c.shape[1]))
    other = c.copy()
    other[r, k:] = data.draw(st.lists(st.floats(0.0, 1.0), min_size=c.shape[1] - k,
                                      max_size=c.shape[1] - k))
    sps = SPSTable(list(range(1, 37)), list(rates * 1000.0))
    hw = HardwareScheduler(sps, padded=padded)
    assert (hw.verify_lengths(c, active)[r] >= k) == (hw.verify_lengths(other, active)[r] >= k)
    history = [data.draw(confidences(*c.shape)) for _ in range(2)]
    results = []
    for current in (c, other):
        sched = AsyncScheduler(sps, padded=padded)
        for old in history:
            sched.verify_lengths(old, np.ones(len(c), bool))
        results.append(sched.verify_lengths(current, active)[r] >= k)
    assert results[0] == results[1]


# --- async (production) ------------------------------------------------------------------

def test_async_uses_two_step_old_confidences_for_the_budget():
    active = np.array([True, True])
    high = np.array([[0.9, 0.9, 0.9], [0.9, 0.9, 0.9]])
    low = np.full((2, 3), 0.02)
    current = np.array([[0.6, 0.5, 0.5], [0.7, 0.2, 0.1]])
    sps = SPSTable([2, 8], [100.0, 80.0])
    hw, sched = HardwareScheduler(sps), AsyncScheduler(sps)
    # No history yet: Algorithm 1 on the current confidences.
    assert sched.verify_lengths(high, active).tolist() == hw.verify_lengths(high, active).tolist()
    assert sched.verify_lengths(low, active).tolist() == hw.verify_lengths(low, active).tolist()
    assert hw.verify_lengths(low, active).sum() == 0
    # Step 3: K from `high` (two steps back) = all 6 drafts, not from `low` (one step back).
    assert sched.verify_lengths(current, active).tolist() == [3, 3]
    # Step 4: K from `low` = 0.
    assert sched.verify_lengths(high, active).tolist() == [0, 0]
    # Step 5: K from `current` = 4, filled with the top 4 CURRENT survivals: .9, .72, .144
    # (row 0) and .1 (row 1).
    assert sched.budget(np.cumprod(current, axis=1), active) == 4
    assert sched.verify_lengths(np.array([[0.9, 0.8, 0.2], [0.1, 0.5, 0.9]]),
                                active).tolist() == [3, 1]


def test_async_full_search_crosses_the_cliff_that_stops_algorithm1():
    active = np.array([True])
    sched = AsyncScheduler(APPENDIX_A)
    for c in ([[0.8, 0.9]], [[0.8, 0.9]]):
        assert sched.verify_lengths(np.array(c), active).tolist() == [0]  # fallback
    assert sched.verify_lengths(np.array([[0.8, 0.9]]), active).tolist() == [2]
    # K = 2 from history, but only one current candidate has a nonzero survival.
    assert sched.verify_lengths(np.array([[0.8, 0.0]]), active).tolist() == [1]


def test_async_reset_and_finished_rows():
    active = np.array([True, True])
    sched = AsyncScheduler(flat())
    ones = np.ones((2, 3))
    for _ in range(3):
        sched.verify_lengths(ones, active)
    # A row finished since two steps ago: its old drafts no longer count towards K.
    assert sched.verify_lengths(ones, np.array([True, False])).tolist() == [3, 0]
    sched.reset()
    assert sched.verify_lengths(np.zeros((2, 3)), active).tolist() == [0, 0]
    with pytest.raises(ValueError, match="call reset"):
        sched.verify_lengths(np.ones((3, 3)), np.ones(3, bool))


# --- factory and inputs ------------------------------------------------------------------

def test_make_scheduler():
    sps = flat()
    assert make_scheduler("fixed", gamma=7).length == 7
    assert make_scheduler("fixed", gamma=7, length=2).length == 2
    assert make_scheduler("threshold", gamma=7, threshold=0.3).threshold == 0.3
    assert isinstance(make_scheduler("hardware", gamma=7, sps=sps), HardwareScheduler)
    assert isinstance(make_scheduler("async", gamma=7, sps=sps), AsyncScheduler)
    for name in ("hardware", "async"):
        with pytest.raises(ValueError, match="bundle has no sps_table.json"):
            make_scheduler(name, gamma=7)
    with pytest.raises(ValueError, match="choose one of fixed, threshold, hardware, async"):
        make_scheduler("global", gamma=7, sps=sps)
    with pytest.raises(ValueError, match=r"0\.\.7"):
        make_scheduler("fixed", gamma=7, length=8)
    with pytest.raises(ValueError, match="gamma"):
        make_scheduler("fixed", gamma=0)


def test_auto_is_hardware_with_an_sps_table_else_threshold():
    assert auto_schedule(flat()) == "hardware"
    assert auto_schedule(None) == "threshold"
    assert isinstance(make_scheduler("auto", gamma=7, sps=flat()), HardwareScheduler)
    assert isinstance(make_scheduler("auto", gamma=7), ThresholdScheduler)  # never fixed: slower than target-only at low tau


@pytest.mark.parametrize("conf, active, message", [
    (np.full((2, 3), 1.5), np.ones(2, bool), r"\[0, 1\]"),
    (np.full((2, 3), np.nan), np.ones(2, bool), r"\[0, 1\]"),
    (np.full(3, 0.5), np.ones(3, bool), r"\[B, G\]"),
    (np.full((2, 3), 0.5), np.ones(2, int), "bool"),
    (np.full((2, 3), 0.5), np.ones(3, bool), r"shape \(2,\)"),
])
def test_bad_inputs(conf, active, message):
    for sched in (FixedScheduler(1), ThresholdScheduler(0.5), HardwareScheduler(flat()),
                  AsyncScheduler(flat())):
        with pytest.raises(ValueError, match=message):
            sched.verify_lengths(conf, active)


def test_runtime_modules_do_not_import_torch():
    code = ("import sys, dspark_runtime.schedule, dspark_runtime.sps, dspark_runtime.calibration;"
            "print([m for m in ('torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

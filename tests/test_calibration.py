"""STS calibration math and the calibration.json format (pure numpy, fast)."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from dspark_runtime.calibration import (
    Calibration, apply_sts, auc, calibration_report, ece, fit_calibration, fit_sts, sigmoid,
)

T_TRUE = np.array([1.0, 1.8, 2.5, 0.7])
GRID = np.geomspace(0.25, 4.0, 81)


def synthetic(n: int, seed: int, verify_all: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a head miscalibrated by T_TRUE; labels are accepted-prefix masks (NaN where
    the block was verified shorter)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(1.5, 2.0, size=(n, len(T_TRUE)))
    survived = rng.random(z.shape) < sigmoid(z / T_TRUE)
    labels = np.cumprod(survived, axis=1).astype(np.float64)
    if not verify_all:
        lengths = rng.integers(0, len(T_TRUE) + 1, size=n)
        labels[np.arange(len(T_TRUE))[None, :] >= lengths[:, None]] = np.nan
    return z, labels


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return synthetic(10_000, seed=1)


def test_sts_recovers_true_temperatures_and_lowers_ece(data):
    z, labels = data
    temps = fit_sts(z, labels, GRID)
    assert np.all(np.abs(np.log(temps / T_TRUE)) < 0.3), temps
    report = calibration_report(z, labels, temps)
    for pos, t in zip(report["positions"], T_TRUE):
        assert pos["n"] == len(z)
        assert pos["ece_after"] < 0.02
        if t != 1.0:
            assert pos["ece_after"] < pos["ece_before"]
    assert report["mean"]["ece_after"] < report["mean"]["ece_before"] / 3


def test_sts_with_partial_verification_matches_nan_and_valid_mask():
    z, labels = synthetic(6_000, seed=2, verify_all=False)
    from_nan = fit_sts(z, labels, GRID)
    valid = ~np.isnan(labels)
    from_mask = fit_sts(z, np.nan_to_num(labels, nan=0.0), GRID, valid=valid)
    np.testing.assert_array_equal(from_nan, from_mask)
    assert np.all(np.abs(np.log(from_nan / T_TRUE)) < 0.45), from_nan


def test_position_without_samples_keeps_unit_temperature(data):
    z, labels = data
    labels = labels.copy()
    labels[:, 2:] = np.nan
    temps = fit_sts(z, labels, GRID)
    np.testing.assert_array_equal(temps[2:], 1.0)
    np.testing.assert_array_equal(fit_sts(z, np.full_like(labels, np.nan), GRID), 1.0)
    report = calibration_report(z, labels, temps)
    assert report["positions"][3] == {"position": 4, "n": 0, "ece_before": None,
                                      "ece_after": None, "auc_before": None, "auc_after": None}


def test_temperature_scaling_preserves_per_step_ranking(data):
    z, labels = data
    for t in (0.5, 1.7, 3.0):
        for k in range(z.shape[1]):
            assert auc(sigmoid(z[:, k] / t), labels[:, k]) == auc(sigmoid(z[:, k]), labels[:, k])
    report = calibration_report(z, labels, fit_sts(z, labels, GRID))
    first = report["positions"][0]
    assert first["auc_after"] == first["auc_before"]  # position 1 is a single factor


def test_apply_sts():
    z = np.array([[0.0, 2.0, -4.0]])
    np.testing.assert_allclose(apply_sts(z, np.array([1.0, 2.0, 4.0])), sigmoid([[0, 1, -1]]))
    np.testing.assert_allclose(apply_sts(np.zeros((2, 5, 3)), np.ones(3)), 0.5)
    with pytest.raises(ValueError, match="3 temperatures"):
        apply_sts(np.zeros((2, 4)), np.ones(3))
    with pytest.raises(ValueError, match="positive"):
        apply_sts(np.zeros((2, 3)), np.array([1.0, 0.0, 1.0]))
    assert sigmoid(np.array([-1e4, 1e4])).tolist() == [0.0, 1.0]  # no overflow warnings


def test_ece_by_hand():
    assert ece([0.1, 0.1, 0.9, 0.9], [0, 0, 1, 1], bins=10) == pytest.approx(0.1)
    assert ece([0.3, 0.3], [1, 0], bins=2) == pytest.approx(0.2)
    assert ece([1.0, 1.0], [1, 1]) == 0.0  # p = 1 falls in the last bin
    assert ece([0.25, 0.75], [0, 1], bins=1) == pytest.approx(0.0)  # one bin: |mean gap|
    assert math.isnan(ece([], []))


def test_auc_against_pair_counting():
    rng = np.random.default_rng(3)
    pred = rng.integers(0, 5, size=200) / 4.0  # many ties
    target = rng.random(200) < 0.4
    pos, neg = pred[target], pred[~target]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert auc(pred, target) == pytest.approx(pairs / (len(pos) * len(neg)))
    assert auc([0.1, 0.2, 0.9], [0, 0, 1]) == 1.0
    assert auc([0.9, 0.2, 0.1], [0, 0, 1]) == 0.0
    assert auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    assert math.isnan(auc([0.1, 0.2], [1, 1]))


@pytest.mark.parametrize("labels, valid, message", [
    ([[1.0, 0.0, 1.0]], None, "prefix label"),
    ([[0.5, 0.0, 0.0]], None, "0 or 1"),
    ([[np.nan, 1.0, 0.0]], None, "prefix of each block"),
    ([[1.0, 1.0, 0.0]], [[True, False, True]], "prefix of each block"),
    ([[1.0, 1.0]], None, r"\[N, G\]"),
])
def test_bad_samples_are_rejected(labels, valid, message):
    with pytest.raises(ValueError, match=message):
        fit_sts(np.zeros((1, 3)), np.array(labels), GRID, valid=valid)


def test_fit_calibration_round_trip(tmp_path, data):
    z, labels = data
    cal = fit_calibration(z[:2000], labels[:2000], GRID)
    assert cal.gamma == 4 and cal.n_samples == 2000 and cal.method == "sts"
    path = tmp_path / "calibration.json"
    cal.save(path)
    raw = json.loads(path.read_text())
    assert raw["version"] == 1 and raw["method"] == "sts" and len(raw["grid"]) == len(GRID)
    assert set(raw["metrics"]) == {"bins", "positions", "mean"}
    loaded = Calibration.load(path, gamma=4)
    assert loaded == cal
    np.testing.assert_array_equal(loaded.apply(z[:3]), apply_sts(z[:3], cal.temperatures))
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.json"]  # no temp files left


@pytest.mark.parametrize("edit, message", [
    ({"version": 2}, "'version' must be 1"),
    ({"method": "platt"}, "'method' must be 'sts'"),
    ({"temperatures": [1.0, -2.0]}, "'temperatures' must be a non-empty list"),
    ({"temperatures": []}, "'temperatures' must be a non-empty list"),
    ({"grid": "1..4"}, "'grid' must be a non-empty list"),
    ({"n_samples": -1}, "'n_samples' must be an integer"),
    ({"metrics": None}, "'metrics' must be an object"),
    ({"temperatures": [1.0, 1.0, 1.0]}, r"'temperatures' has 3 entries but .* \(gamma\) is 2"),
])
def test_bad_calibration_json_names_file_and_field(tmp_path, edit, message):
    good = {"version": 1, "method": "sts", "temperatures": [1.0, 1.5], "grid": [1.0, 1.5],
            "n_samples": 10, "metrics": {}}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({**good, **edit}))
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: {message}"):
        Calibration.load(path, gamma=2)


def test_calibration_json_that_is_not_json(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        Calibration.load(path)

"""`dspark-export calibrate`: recording, STS fit, calibration.json in the bundle, runtime pickup."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dspark_export.calibrate import (CalibrationError, Rounds, calibration_prompts,
                                     check_calibratable, record_prompts, write_calibration)
from dspark_export.cli_calibrate import calibrate
from dspark_runtime.bundle import Bundle, BundleError, sha256_file
from dspark_runtime.calibration import Calibration, apply_sts

GAMMA = 4
PROMPTS = ["t5 t6 t7 t8 t9", "t20", "t30 t31 t32 t33 t34 t35", "t40 t41", "t50 t51 t52"]


@pytest.fixture()
def bundle(tiny_cpu_bundle, tmp_path) -> Path:
    """A fresh copy per test (calibration rewrites the bundle)."""
    import shutil

    return Path(shutil.copytree(tiny_cpu_bundle, tmp_path / "bundle"))


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def test_labels_are_accepted_prefix_masks():
    z = np.zeros((4, 3))
    rounds = Rounds(z, np.array([0, 2, 3, 1]), np.array([3, 3, 3, 1]), np.arange(4),
                    np.zeros(4, dtype=np.int64))
    nan = np.nan
    np.testing.assert_array_equal(rounds.labels(), [[0, 0, 0], [1, 1, 0], [1, 1, 1],
                                                    [1, nan, nan]])
    assert rounds.tau() == pytest.approx(1 + 6 / 4)
    assert rounds.acceptance_per_position() == pytest.approx([3 / 4, 2 / 2, 1 / 2])


def test_rounds_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, GAMMA))
    rounds = Rounds(z, np.array([1, 4, 0, 2, 3]), np.array([4, 4, 4, 4, 3]),
                    np.array([0, 0, 1, 1, 1]), np.array([0, 1, 0, 1, 2]), temperature=1.0)
    back = Rounds.load(rounds.save(tmp_path / "r.json", note="x"))
    np.testing.assert_allclose(back.logits, z, atol=1e-5)
    for key in ("accepted", "verified", "request", "step"):
        np.testing.assert_array_equal(getattr(back, key), getattr(rounds, key))
    assert back.temperature == 1.0
    with pytest.raises(CalibrationError, match="recorded-rounds"):
        Rounds.from_json({"format": "other"})


def test_calibrate_writes_verified_calibration(bundle, prompts_file):
    result = CliRunner().invoke(calibrate, [str(bundle), "--prompts", str(prompts_file),
                                            "--max-new-tokens", "24",
                                            "--save-rounds", str(bundle.parent / "r.json")])
    assert result.exit_code == 0, result.output
    for header in ("ECE before", "ECE after", "AUC before", "AUC after"):
        assert header in result.output
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["calibration"] == "calibration.json"
    assert manifest["files"]["calibration.json"] == sha256_file(bundle / "calibration.json")
    loaded = Bundle.load(bundle)  # every hash, the new file included
    assert loaded.calibration_path == bundle / "calibration.json"

    cal = Calibration.load(bundle / "calibration.json", gamma=GAMMA)
    positions = cal.metrics["positions"]
    assert [p["position"] for p in positions] == list(range(1, GAMMA + 1))
    for p in positions:
        assert set(p) == {"position", "n", "ece_before", "ece_after", "auc_before", "auc_after"}
    assert positions[0]["n"] == cal.n_samples > 0  # full block: position 1 of every round
    assert positions[0]["ece_after"] <= positions[0]["ece_before"] + 1e-9
    raw = json.loads((bundle / "calibration.json").read_text())
    assert raw["fitted_on"]["prompts"]["n_prompts"] == len(PROMPTS)
    assert raw["fitted_on"]["temperature"] == 0.0
    rounds = Rounds.load(bundle.parent / "r.json")
    assert len(rounds) == raw["fitted_on"]["rounds"] == cal.n_samples

    from dspark_runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle)
    assert pipe.calibration is not None and pipe.calibration.temperatures == cal.temperatures


def test_recording_does_not_change_generation(tiny_cpu_bundle):
    from dspark_runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(tiny_cpu_bundle, schedule="fixed")  # recording verifies the full block
    rounds = record_prompts(pipe, PROMPTS, max_new_tokens=16, batch_size=3)
    plain = (pipe.generate(PROMPTS[:3], max_new_tokens=16, seed=[0, 1, 2]).requests
             + pipe.generate(PROMPTS[3:], max_new_tokens=16, seed=[3, 4]).requests)
    for r, out in enumerate(plain):
        rows = rounds.request == r
        assert rounds.accepted[rows].tolist() == out.accepted
        assert rounds.verified[rows].tolist() == out.verified
        assert rounds.step[rows].tolist() == list(range(len(out.accepted)))


def test_runtime_applies_the_written_calibration(bundle):
    from dspark_runtime.calibration import fit_calibration
    from dspark_runtime.pipeline import Pipeline

    temps = np.array([2.0, 3.0, 0.5, 1.25])
    z = np.random.default_rng(1).normal(size=(50, GAMMA))
    cal = fit_calibration(z, np.zeros_like(z))
    cal = Calibration(list(temps), cal.grid, cal.n_samples, cal.metrics)
    write_calibration(bundle, cal)
    pipe = Pipeline.from_bundle(bundle)
    assert pipe.calibration.temperatures == list(temps)

    seen, rounds = [], []

    class Spy:
        name = "spy"

        def verify_lengths(self, confidences, active):
            seen.append(np.array(confidences)[np.asarray(active, dtype=bool)])
            return np.where(active, 1, 0)

        def reset(self):
            pass

    pipe.generate(PROMPTS[:2], max_new_tokens=8, schedule=Spy(), on_round=rounds.append)
    assert seen and len(seen) == len(rounds)
    for confidences, record in zip(seen, rounds):
        np.testing.assert_allclose(confidences, apply_sts(record.confidence_logits, temps),
                                   rtol=1e-12)


def test_tampered_calibration_is_refused(bundle, prompts_file):
    result = CliRunner().invoke(calibrate, [str(bundle), "--prompts", str(prompts_file),
                                            "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    data = json.loads((bundle / "calibration.json").read_text())
    data["temperatures"][0] = 9.0
    (bundle / "calibration.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="sha256 mismatch for 'calibration.json'"):
        Bundle.load(bundle)


def test_export_folder_is_refused(tmp_path, prompts_file):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "export.json").write_text("{}")
    result = CliRunner().invoke(calibrate, [str(folder), "--prompts", str(prompts_file)])
    assert result.exit_code != 0
    assert "export folder" in result.output and "dspark-export build" in result.output
    assert sorted(p.name for p in folder.iterdir()) == ["export.json"]
    with pytest.raises(CalibrationError, match="not a bundle"):
        check_calibratable(tmp_path)


def test_eval_prompts_are_refused(bundle, tmp_path):
    eval_dir = tmp_path / "shared" / "eval"
    eval_dir.mkdir(parents=True)
    (eval_dir / "gsm8k.jsonl").write_text(json.dumps({"prompt": "t5 t6"}) + "\n")
    before = (bundle / "manifest.json").read_bytes()
    result = CliRunner().invoke(calibrate, [str(bundle), "--prompts",
                                            str(eval_dir / "gsm8k.jsonl")])
    assert result.exit_code != 0
    assert "evaluation prompt file" in result.output
    assert (bundle / "manifest.json").read_bytes() == before
    assert not (bundle / "calibration.json").exists()
    from dspark_export.distill_data import EVAL_DIR

    real = sorted(EVAL_DIR.glob("*.jsonl"))
    if real:
        with pytest.raises(CalibrationError, match="evaluation prompt file"):
            calibration_prompts(real[0], None)


def test_default_prompts_come_from_the_offline_corpus():
    texts, source = calibration_prompts(None, 5, seed=3)
    assert len(texts) == 5 and source["source"] == "distill_data.build_corpus"
    assert calibration_prompts(None, 5, seed=3)[0] == texts


def test_no_rounds_leaves_the_bundle_untouched(bundle, prompts_file):
    before = (bundle / "manifest.json").read_bytes()
    result = CliRunner().invoke(calibrate, [str(bundle), "--prompts", str(prompts_file),
                                            "--max-new-tokens", "1"])
    assert result.exit_code != 0
    assert "no verified draft positions" in result.output
    assert (bundle / "manifest.json").read_bytes() == before
    assert not (bundle / "calibration.json").exists()

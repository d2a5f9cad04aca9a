"""`dspark-export profile` on a tiny random pair: report fields, files, errors (issue 8)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from dspark_export.cli_profile import profile
from dspark_export.profile import (ALL, MODES, ProfileError, load_eval_prompts, pooled_acceptance,
                                   profile_modes, read_prompt_file)

GAMMA = 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    """A tiny llama target + random drafter (block 4), exported: an export folder is a runnable
    bundle. It is test_runtime's session export, so a full run exports it once."""
    from conftest import export_tiny_pair

    return export_tiny_pair(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("prompts")
    math = root / "math.jsonl"
    math.write_text("\n".join(json.dumps({"turns": [t, "second turn is ignored"]})
                              for t in ("t5 t6 t7 t8", "t40 t41", "t9 t9 t9")) + "\n")
    chat = root / "chat.txt"
    chat.write_text("t20 t21 t22\n\nt30 t31 t32 t33 t34 t35\n")
    return [math, chat]


def _invoke(*args: str):
    return CliRunner().invoke(profile, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def report_run(tiny_bundle, prompt_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile_out")
    result = _invoke(tiny_bundle, "--prompts", prompt_files[0], "--prompts", prompt_files[1],
                     "--per-domain", "2", "--max-new-tokens", "10", "--out", out)
    assert result.exit_code == 0, result.output
    return result, out


def test_profile_writes_json_and_pngs_with_all_modes(report_run):
    _, out = report_run
    report = json.loads((out / "profile.json").read_text())
    assert report["format"] == "dspark-profile/1"
    assert list(report["domains"]) == ["math", "chat", ALL]
    assert list(report["modes"]) == list(MODES)
    assert report["settings"]["temperature"] == 0.0 and report["settings"]["gamma"] == GAMMA
    assert report["settings"]["scheduler"] == "threshold"  # an export folder has no SPS table
    assert report["domains"]["math"]["prompts"] == 2 and report["domains"][ALL]["prompts"] == 4
    for domain, entry in report["domains"].items():
        modes = entry["modes"]
        assert set(modes) == set(MODES)
        for name, s in modes.items():
            assert s["tau"] >= 1.0 and s["new_tokens"] > 0 and s["tokens_per_s"] > 0
            assert s["speedup_vs_target_only"] > 0 and s["speedup_vs_mtp1"] > 0
            assert set(s["stage_ms_per_step"]) >= {"draft", "markov", "target_verify", "host"}
            assert all(r is None or 0.0 <= r <= 1.0 for r in s["acceptance_per_position"])
            assert s["same_as_target"] == s["requests"]  # greedy through the runtime: lossless
        assert modes["target_only"]["tau"] == 1.0
        assert modes["target_only"]["acceptance_per_position"] == []
        assert modes["target_only"]["speedup_vs_target_only"] == pytest.approx(1.0)
        assert modes["mtp1"]["speedup_vs_mtp1"] == pytest.approx(1.0)
        assert modes["mtp1"]["mean_verify_length"] <= 1.0
        assert len(modes["mtp1"]["acceptance_per_position"]) == 1
        assert len(modes["dspark_fixed"]["acceptance_per_position"]) == GAMMA
        assert modes["dspark_fixed"]["tau"] <= GAMMA + 1
    # Interleaved prompt by prompt: each prompt's four modes run back to back.
    runs = report["runs"]
    assert len(runs) == 4 * len(MODES)
    for i in range(0, len(runs), len(MODES)):
        block = runs[i:i + len(MODES)]
        assert {r["mode"] for r in block} == set(MODES)
        assert len({(r["domain"], r["prompt"]) for r in block}) == 1
    for name in ("tokens_per_s.png", "acceptance.png", "stages.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_profile_prints_tables(report_run):
    result, out = report_run
    text = result.stdout
    for word in ("target only", f"DSpark fixed {GAMMA}", "DSpark threshold", "MTP-1 budget",
                 "math", "chat", "vs target", "vs MTP-1", "ms per generated token"):
        assert word in text
    assert str(out / "profile.json") in text


def test_profile_json_flag_and_default_out_dir(tiny_bundle, prompt_files, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")  # the shared export stays as is
    result = _invoke(bundle, "--prompts", prompt_files[1], "--per-domain", "1",
                     "--max-new-tokens", "4", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(report["domains"]) == ["chat", ALL]
    assert (bundle / "profile" / "profile.json").is_file()
    assert (bundle / "profile" / "tokens_per_s.png").is_file()


def test_profile_modes_use_the_hardware_scheduler_with_an_sps_table():
    from dspark_runtime.sps import SPSTable

    from dspark_runtime.pipeline import Pipeline

    sps = SPSTable([1, 8], [100.0, 80.0])
    pipe = SimpleNamespace(gamma=5, sps=sps, threshold=0.5, schedule="auto")
    pipe.make_scheduler = lambda name=None, threshold=None: Pipeline.make_scheduler(
        pipe, name, threshold)
    modes = {m.name: m for m in profile_modes(pipe)}
    assert list(modes) == list(MODES)
    assert modes["dspark_scheduled"].options["schedule"].name == "hardware"
    assert modes["dspark_scheduled"].options["schedule"].padded  # as the runtime's graphs run
    assert modes["dspark_fixed"].options["schedule"].length == 5
    assert modes["mtp1"].options["schedule"].length == 1
    assert modes["target_only"].options == {"target_only": True}
    pipe.sps = None
    assert profile_modes(pipe)[2].options["schedule"].name == "threshold"


def test_pooled_acceptance_is_conditional_per_position():
    request = SimpleNamespace(accepted=[0, 2, 1, 3], verified=[3, 3, 1, 3])
    result = SimpleNamespace(requests=[request])
    # k=1: 4 reached, 3 passed; k=2: reached by rounds with v>=2 and a>=1 -> (2,3),(3,3): 2
    # passed; k=3: reached (2,3),(3,3): 1 passed.
    assert pooled_acceptance([result]) == [0.75, 1.0, 0.5]
    assert pooled_acceptance([SimpleNamespace(requests=[SimpleNamespace(accepted=[],
                                                                          verified=[])])]) == []


def test_prompt_files_and_their_errors(tmp_path, monkeypatch):
    good = tmp_path / "code.jsonl"
    good.write_text('{"prompt": "a"}\n{"text": "b"}\n"c"\n{"turns": ["d"]}\n')
    assert read_prompt_file(good) == ["a", "b", "c", "d"]
    assert read_prompt_file(good, 2) == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ProfileError, match=r"bad.jsonl:2: not a JSON object"):
        read_prompt_file(bad)
    missing_field = tmp_path / "nofield.jsonl"
    missing_field.write_text('{"question": "a"}\n')
    with pytest.raises(ProfileError, match="'turns' list, 'prompt' or 'text'"):
        read_prompt_file(missing_field)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ProfileError, match="no prompts"):
        read_prompt_file(empty)
    other = tmp_path / "sub"
    other.mkdir()
    (other / "code.txt").write_text("x\n")
    with pytest.raises(ProfileError, match="domain name 'code'"):
        load_eval_prompts(1, [good, other / "code.txt"])
    monkeypatch.setenv("DSPARK_EVAL_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ProfileError, match="--prompts FILE"):
        load_eval_prompts(1)


def test_profile_cli_errors_are_clear(tiny_bundle, tmp_path):
    not_bundle = tmp_path / "nothing"
    not_bundle.mkdir()
    prompts = tmp_path / "p.txt"
    prompts.write_text("t5 t6\n")
    result = _invoke(not_bundle, "--prompts", prompts)
    assert result.exit_code == 1 and "missing manifest.json" in result.output

    empty = tmp_path / "e.txt"
    empty.write_text("")
    result = _invoke(tiny_bundle, "--prompts", empty)
    assert result.exit_code == 1 and "no prompts" in result.output

    result = _invoke(tiny_bundle, "--prompts", tmp_path / "absent.txt")
    assert result.exit_code == 2 and "does not exist" in result.output

    result = _invoke(tiny_bundle, "--prompts", prompts, "--per-domain", "0")
    assert result.exit_code == 2 and "--per-domain" in result.output

    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text(" ".join(f"t{3 + i % 250}" for i in range(600)) + "\n")
    out = tmp_path / "out"
    result = _invoke(tiny_bundle, "--prompts", long_prompt, "--out", out)
    assert result.exit_code == 1 and "context limit" in result.output and "long" in result.output
    assert not out.exists()  # refused before anything was written

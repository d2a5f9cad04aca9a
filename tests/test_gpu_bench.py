"""bench/gpu.py's CPU-side pieces (the full `--device cpu --tiny` run is done by hand: ~25 s)."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_args_and_prompts(gpu):
    args = gpu.parse_args(["--tiny", "--device", "cpu", "--concurrency", "1,8"])
    assert args.concurrency == (1, 8) and args.device == "cpu"
    with pytest.raises(SystemExit):
        gpu.parse_args([])
    prompts = gpu.load_prompts()
    assert len(prompts) == 32 and all(p.strip() for p in prompts)


def test_reference_tokens_match_the_prompts(gpu):
    if not gpu.REFERENCE_FILE.is_file():
        pytest.skip("bench/data/gpu_reference_tokens.json not written yet")
    ref = json.loads(gpu.REFERENCE_FILE.read_text())
    assert set(ref["tokens"]) == {str(i) for i in range(32)} == set(ref["prompt_ids"])


def test_time_box_stops_a_phase(gpu):
    with pytest.raises(gpu.PhaseTimeout):
        with gpu.time_box(0.05):
            time.sleep(1)


def test_table_has_every_part(gpu):
    stages = {s: 1.0 for s in gpu.STAGES}
    summary = {"tokens_per_s": 100.0, "tau": 1.0, "step_ms": 10.0, "stage_ms_per_step": stages}
    report = {
        "env": {"gpu": "NVIDIA H200", "onnxruntime": "1.31.1"}, "bundle": "b", "max_new_tokens": 128,
        "bench": {"table": {"1": {"target_only": summary,
                                  "dspark_fixed": dict(summary, tokens_per_s=250.0, tau=3.1)}}},
        "eager": {"dtype": "bfloat16", "tokens_per_s": 23.0},
        "sps": {"device": "NVIDIA H200", "backend": "onnxruntime", "past_length": 512,
                "points": [{"tokens": 1, "steps_per_s": 400.0, "median_ms": 2.5}]},
        "parity": {"status": "31/32 equal", "rows": [
            {"prompt": 3, "status": "diverged", "position": 40, "top2_margin": 0.01,
             "cpu_minus_gpu_logit": 0.004}]},
        "phases": {"bench": {"seconds": 3.0, "status": "ok"}},
    }
    table = gpu.format_table(report)
    for text in ("NVIDIA H200", "| 1 | dspark_fixed | 250.0 | 3.10 |", "2.50x",
                 "4.3x eager", "| 1 | 400.0 | 2.500 |", "first divergence at token 40",
                 "bench 3s ok"):
        assert text in table, text

"""The cpu profile's rewrite of the target into ONNX Runtime's fused kernels (ort_fusions.py):
every RMSNorm and rotary embedding fused, the same logits, rows that round alike whatever runs
beside them, and DSpark on the built bundle equal to its own target-only decoding."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import export_tiny_pair

from dspark_export.build.ort_fusions import fuse_for_cpu
from dspark_runtime.pipeline import Pipeline

LAYERS = 4  # conftest.make_tiny_target


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> tuple[Path, Path, dict[str, int]]:
    export = export_tiny_pair(tmp_path_factory.getbasetemp())
    fused = tmp_path_factory.mktemp("fused") / "target.onnx"
    counts = fuse_for_cpu(export / "target.onnx", fused, max_positions=512)
    return export / "target.onnx", fused, counts


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(session: ort.InferenceSession, ids: np.ndarray, past: np.ndarray, new: np.ndarray,
           cache: int = 24, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of `ids` [B, T] after past[b] cached positions (random K/V in a buffer of `cache`)."""
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": ids, "position_ids": past[:, None] + np.arange(ids.shape[1]),
             "past_lengths": past, "new_lengths": new}
    for i in session.get_inputs():
        if i.name.startswith(("past_key_", "past_value_")):
            _, heads, _, dim = i.shape
            feeds[i.name] = rng.standard_normal((len(ids), heads, cache, dim), dtype=np.float32)
    return feeds


def test_every_norm_and_rotary_is_fused(graphs):
    _, fused, counts = graphs
    # per layer two norms (all but the first after a residual Add), two rotations (q, k) and
    # five projections packed in two MatMuls (q, k, v; gate, up), plus the final norm
    assert counts == {"SimplifiedLayerNormalization": 2 * LAYERS + 1,
                      "SkipSimplifiedLayerNormalization": 2 * LAYERS,
                      "RotaryEmbedding": 2 * LAYERS, "packed MatMul": 5 * LAYERS}
    ops = [n.op_type for n in onnx.load(str(fused), load_external_data=False).graph.node]
    assert ops.count("RotaryEmbedding") == 2 * LAYERS
    assert "Cos" not in ops and "Pow" not in ops and "Neg" not in ops
    # per layer: scores and weighted values, over the cache and over the new tokens (4), the
    # packed q/k/v, o, the packed gate/up and down (4); and the lm_head
    assert ops.count("MatMul") == 8 * LAYERS + 1


def test_fused_target_gives_the_same_outputs(graphs):
    raw, fused, _ = graphs
    before, after = _session(raw), _session(fused)
    rng = np.random.default_rng(3)
    feeds = _feeds(before, rng.integers(3, 200, (2, 5)), np.array([7, 19]), np.array([5, 2]))
    valid = feeds["new_lengths"]  # positions past a row's valid tokens are padding
    for name, want, got in zip([o.name for o in before.get_outputs()],
                               before.run(None, feeds), after.run(None, feeds)):
        for b, n in enumerate(valid):
            pick = (b, slice(None), slice(0, n)) if name.startswith("present") else (b, slice(0, n))
            np.testing.assert_allclose(got[pick], want[pick], rtol=1e-4, atol=1e-4, err_msg=name)


def test_verify_pass_and_decode_step_round_alike(graphs):
    """Lossless speculation needs a token's logits not to depend on the tokens or rows beside
    it: the first of four verified tokens equals a one-token decode step bit for bit, and so
    does a row of a batch of two."""
    _, fused, _ = graphs
    session = _session(fused)
    ids = np.array([[11, 12, 13, 14]])
    verify = session.run(["logits"], _feeds(session, ids, np.array([9]), np.array([4])))[0]
    step = session.run(["logits"], _feeds(session, ids[:, :1], np.array([9]), np.array([1])))[0]
    np.testing.assert_array_equal(verify[0, 0], step[0, 0])
    pair = _feeds(session, np.array([[11], [40]]), np.array([9, 3]), np.array([1, 1]))
    alone = {k: v[:1] for k, v in pair.items()}
    np.testing.assert_array_equal(session.run(["logits"], pair)[0][0],
                                  session.run(["logits"], alone)[0][0])


def test_cpu_bundle_is_fused_and_lossless(tiny_cpu_bundle):
    manifest = json.loads((tiny_cpu_bundle / "manifest.json").read_text())
    fused = manifest["session_options"]["offline"]["contrib_fusions"]["target"]
    assert fused["RotaryEmbedding"] == 2 * LAYERS
    prompts = ["t5 t6 t7 t8 t9", "t20", "t30 t31 t32 t33 t34 t35"]
    with Pipeline.from_bundle(tiny_cpu_bundle, schedule="fixed") as pipe:
        target = pipe.generate(prompts, max_new_tokens=24, target_only=True)
        dspark = pipe.generate(prompts, max_new_tokens=24)
    for a, b in zip(dspark.requests, target.requests):
        assert a.token_ids == b.token_ids


def test_bundle_target_takes_every_position_a_verify_pass_pads_to(tiny_cpu_bundle):
    """The rotary tables end somewhere: past the profile's context by the widest verify pass,
    whose padded positions run beyond a full row's last one."""
    manifest = json.loads((tiny_cpu_bundle / "manifest.json").read_text())
    profile = manifest["profile"]
    session = _session(tiny_cpu_bundle / "target.onnx")
    width = profile["gamma_max"] + 1
    last = profile["max_context"] - 1
    feeds = _feeds(session, np.full((1, width), 7), np.array([last]), np.array([1]))
    assert np.isfinite(session.run(["logits"], feeds)[0][0, 0]).all()

"""Every exported graph on ONNX Runtime CPU matches PyTorch (issue 3 parity)."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from dspark_export.build.ort_fusions import fuse_for_cpu
from dspark_export.export import ExportError, export_graphs
from dspark_export.export.torch_onnx import export_graph
from dspark_export.export.wrappers import draft_spec, markov_spec, target_spec
from dspark_export.models.draft import make_random_drafter, save_drafter
from dspark_export.models.target import TargetAdapter, load_target

HEADS = {"vanilla": ("vanilla", 16), "gated": ("gated", 16), "rnn": ("rnn", 16), "none": ("vanilla", 0)}
SHAPES = [  # (batch, new tokens, cache length)
    (1, 1, 0), (1, 8, 37), (3, 1, 37), (3, 8, 0), (3, 8, 37),
]


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def assert_logits_close(got: np.ndarray, want: np.ndarray) -> None:
    """fp32 rule of issue 3: max |diff| <= 1e-4 x the logits' range."""
    span = float(want.max() - want.min())
    assert np.abs(got - want).max() <= 1e-4 * span, (np.abs(got - want).max(), span)


def ragged_lengths(rng, batch: int, high: int, low: int = 0) -> torch.Tensor:
    """Per-row lengths: the first row full, the others random (rows of different lengths)."""
    lengths = rng.integers(low, high + 1, size=batch)
    lengths[0] = high
    return torch.from_numpy(lengths)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_target_graph_parity(tiny_targets, tmp_path, family):
    """The exported target, and the cpu profile's rewrite of it into ORT's fused kernels
    (build/ort_fusions.py), against the PyTorch adapter."""
    model, _ = load_target(tiny_targets[family])
    adapter = TargetAdapter(model, [-1, 1, 2])
    spec = target_spec(adapter, torch.float32)
    export_graph(spec, tmp_path / "target.onnx", 18)
    (tmp_path / "fused").mkdir()
    fused = fuse_for_cpu(tmp_path / "target.onnx", tmp_path / "fused" / "target.onnx",
                         max_positions=512)
    layers = adapter.shapes.num_layers
    assert fused["RotaryEmbedding"] == 2 * layers
    assert fused["SkipSimplifiedLayerNormalization"] == 2 * layers
    assert fused["packed MatMul"] == 5 * layers  # q, k, v and gate, up
    sessions = [session(tmp_path / "target.onnx"), session(tmp_path / "fused" / "target.onnx")]
    rng = np.random.default_rng(0)
    s = adapter.shapes
    for batch, tokens, cache in SHAPES:
        past = ragged_lengths(rng, batch, cache)
        new = ragged_lengths(rng, batch, tokens, low=1)
        ids = torch.from_numpy(rng.integers(3, s.vocab_size, (batch, tokens)))
        positions = past[:, None] + torch.arange(tokens)[None]
        kv = [torch.randn(batch, s.num_kv_heads, cache, s.head_dim) for _ in range(2 * s.num_layers)]
        inputs = (ids, positions, past, new, *kv)
        with torch.no_grad():
            want = spec.module(*inputs)
        for sess in sessions:
            got = sess.run(None, {n: t.numpy() for n, t in zip(spec.input_names, inputs)})
            assert_logits_close(got[0], want[0].numpy())
            for g, w in zip(got[1:], want[1:]):
                np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def llama(tiny_targets):
    model, _ = load_target(tiny_targets["llama"])
    return model


@pytest.mark.parametrize("head,draft_vocab", [(h, False) for h in HEADS]
                         + [("vanilla", True), ("rnn", True), ("none", True)])
def test_draft_and_markov_graph_parity(llama, tmp_path, head, draft_vocab):
    kind, rank = HEADS[head]
    drafter = make_random_drafter(llama.config, num_layers=2, block_size=4, target_layer_ids=[0, 2],
                                  markov_rank=rank, markov_head_type=kind, seed=1)
    c = drafter.config
    vocab = None
    if draft_vocab:  # a draft vocabulary: graphs score 100 of the 256 tokens
        vocab = torch.from_numpy(np.random.default_rng(2).choice(c.vocab_size, 100, replace=False))
        drafter.restrict_vocab(vocab)
    dspec, mspec = draft_spec(drafter, torch.float32), markov_spec(drafter, torch.float32)
    export_graph(dspec, tmp_path / "draft.onnx", 18)
    export_graph(mspec, tmp_path / "markov.onnx", 18)
    dsess, msess = session(tmp_path / "draft.onnx"), session(tmp_path / "markov.onnx")
    rng = np.random.default_rng(1)
    for batch, ctx, cache in SHAPES:
        past = ragged_lengths(rng, batch, cache)
        ctx_len = ragged_lengths(rng, batch, ctx)
        anchor_pos = past + ctx_len
        block = torch.full((batch, c.block_size), c.mask_token_id)
        block[:, 0] = torch.from_numpy(rng.integers(3, c.vocab_size, batch))
        inputs = (
            block, anchor_pos[:, None] + torch.arange(c.block_size)[None],
            torch.randn(batch, ctx, c.feature_size), past[:, None] + torch.arange(ctx)[None],
            ctx_len, past,
            *[torch.randn(batch, c.num_kv_heads, cache, c.head_dim) for _ in range(2 * c.num_layers)],
        )
        with torch.no_grad():
            want = dspec.module(*inputs)
        got = dsess.run(None, {n: t.numpy() for n, t in zip(dspec.input_names, inputs)})
        assert_logits_close(got[1], want[1].numpy())
        for g, w in zip([got[0], *got[2:]], [want[0], *want[2:]]):
            np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=1e-4)

        temperature = torch.tensor([0.0, 1.0, 0.7][:batch])
        minputs = (want[1], want[0], block[:, 0], temperature, torch.rand(batch, c.block_size))
        with torch.no_grad():
            mwant = mspec.module(*minputs)
        mgot = msess.run(None, {n: t.numpy() for n, t in zip(mspec.input_names, minputs)})
        np.testing.assert_array_equal(mgot[0], mwant[0].numpy())
        np.testing.assert_allclose(mgot[1], mwant[1].numpy(), atol=1e-5)
        np.testing.assert_allclose(mgot[2], mwant[2].numpy(), atol=1e-4, rtol=1e-4)
        assert mgot[1].shape[-1] == c.vocab_size  # SpecVerify always sees all V tokens
        if vocab is not None:
            assert want[1].shape[-1] == len(vocab)
            outside = np.setdiff1d(np.arange(c.vocab_size), vocab.numpy())
            assert np.isin(mgot[0], vocab.numpy()).all()
            assert np.abs(mgot[1][..., outside]).max() == 0.0
            np.testing.assert_allclose(mgot[1].sum(-1), 1.0, atol=1e-5)


def test_export_folder_is_complete_and_atomic(tiny_targets, tmp_path):
    model, _ = load_target(tiny_targets["qwen3"])
    drafter = make_random_drafter(model.config, num_layers=1, block_size=3, target_layer_ids=[1], seed=2)
    save_drafter(drafter, tmp_path / "draft")
    out = export_graphs(tiny_targets["qwen3"], tmp_path / "draft", tmp_path / "export")
    description = json.loads((out / "export.json").read_text())
    assert set(description["graphs"]) == {"target", "draft", "markov", "verify"}
    assert description["gamma"] == 3 and description["target_layer_ids"] == [1]
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an export folder"):
        export_graphs(tiny_targets["qwen3"], tmp_path / "draft", tmp_path / "occupied")
    with pytest.raises(ExportError, match="precision"):
        export_graphs(tiny_targets["qwen3"], tmp_path / "draft", tmp_path / "x", precision="int3")


def test_unsupported_architecture_fails_before_work(tiny_targets, tmp_path):
    bad = tmp_path / "gpt2"
    bad.mkdir()
    config = json.loads((tiny_targets["llama"] / "config.json").read_text())
    config["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not supported"):
        export_graphs(bad, tmp_path / "draft", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_graphs_keep_fp32_logits(tiny_targets, tmp_path, precision):
    model, _ = load_target(tiny_targets["llama"])
    drafter = make_random_drafter(model.config, num_layers=1, block_size=3, target_layer_ids=[1], seed=4)
    save_drafter(drafter, tmp_path / "draft")
    out = export_graphs(tiny_targets["llama"], tmp_path / "draft", tmp_path / "export", precision=precision)
    graphs = json.loads((out / "export.json").read_text())["graphs"]
    dtypes = {g: {v["name"]: v["dtype"] for v in graphs[g]["inputs"] + graphs[g]["outputs"]} for g in graphs}
    half = {"fp16": "float16", "bf16": "bfloat16"}[precision]
    assert dtypes["target"]["past_key_0"] == half and dtypes["target"]["features"] == half
    assert dtypes["target"]["logits"] == "float32" and dtypes["draft"]["base_logits"] == "float32"
    assert dtypes["markov"]["draft_probs"] == "float32"
    if precision == "fp16":  # ONNX Runtime's CPU provider runs fp16 graphs (not bf16 ones)
        sess = session(out / "target.onnx")
        s = TargetAdapter(model, [1]).shapes
        ids = np.arange(3, 11)[None]
        feeds = {"input_ids": ids, "position_ids": np.arange(8)[None], "past_lengths": np.array([0]),
                 "new_lengths": np.array([8]),
                 **{f"past_{kind}_{i}": np.zeros((1, s.num_kv_heads, 0, s.head_dim), np.float16)
                    for i in range(s.num_layers) for kind in ("key", "value")}}
        logits = sess.run(["logits"], feeds)[0]
        with torch.no_grad():
            want = model(torch.from_numpy(ids)).logits.numpy()
        span = float(want.max() - want.min())
        assert np.abs(logits - want).max() <= 2e-2 * span

"""dspark_runtime: KV commits, sampling, tokenizer, and the draft/verify loop against the
PyTorch reference (issue 4)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import export_tiny_pair

from dspark_runtime.kv import ALLOCATION_STEP, HostMemory, KVCache, allocation
from dspark_runtime.sampling import RequestRandomness, select_tokens
from dspark_runtime.tokenizer import StreamDecoder, TextTokenizer

MAX_NEW = 24
PROMPTS = ["t5 t6 t7 t8 t9", "t20", "t30 t31 t32 t33 t34 t35 t36 t37 t38 t39 t40"]
NEAR_TIE = 1e-3  # relative top-2 logit margin under which greedy may pick either token


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    return export_tiny_pair(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def pipe(tiny_export):
    """Fixed full-block verification by default: what the PyTorch reference decoder does."""
    from dspark_runtime.pipeline import Pipeline

    return Pipeline.from_bundle(tiny_export, schedule="fixed")


@pytest.fixture(scope="session")
def pair(tiny_export):
    from dspark_export.pair import load_pair

    root = tiny_export.parent
    return load_pair(root / "runtime_tiny_target", root / "runtime_tiny_draft")


# ---------------------------------------------------------------- pieces (no graphs)

def test_kv_commit_writes_accepted_prefix_per_row():
    kv = KVCache(HostMemory(), layers=2, batch=3, heads=2, capacity=10, head_dim=4)
    kv.lengths[:] = [0, 3, 5]
    rng = np.random.default_rng(0)
    present = {f"present_{kind}_{i}": rng.normal(size=(3, 2, 4, 4)).astype(np.float32)
               for i in range(2) for kind in ("key", "value")}
    kv.commit(present, np.array([4, 0, 2]))
    assert kv.lengths.tolist() == [4, 3, 7]
    for i in range(2):
        k, p = kv.keys[i], present[f"present_key_{i}"]
        np.testing.assert_array_equal(k[0, :, :4], p[0])
        assert not k[1].any()  # count 0: untouched
        np.testing.assert_array_equal(k[2, :, 5:7], p[2, :, :2])
        assert not k[2, :, 7:].any()
    with pytest.raises(ValueError, match="overflow"):
        kv.commit(present, np.array([4, 0, 4]))


@pytest.mark.parametrize("rows", [2, 6])  # the row-by-row and the fancy-indexed path
def test_host_commit_appends_each_rows_prefix(rows):
    rng = np.random.default_rng(rows)
    caches = [np.zeros((rows, 2, 12, 4), np.float32) for _ in range(3)]
    presents = [rng.normal(size=(rows, 2, 4, 4)).astype(np.float32) for _ in range(3)]
    lengths, counts = rng.integers(0, 8, rows), rng.integers(0, 5, rows)
    counts[0] = 0
    HostMemory().commit(caches, presents, lengths, counts)
    for cache, present in zip(caches, presents):
        want = np.zeros_like(cache)
        for b in range(rows):
            want[b, :, lengths[b]:lengths[b] + counts[b]] = present[b, :, :counts[b]]
        np.testing.assert_array_equal(cache, want)


def test_kv_feeds_are_views_of_the_buffers():
    kv = KVCache(HostMemory(), layers=1, batch=4, heads=2, capacity=8, head_dim=4)
    feeds = kv.feeds(1, 3)
    assert feeds["past_key_0"].shape == (2, 2, 8, 4)
    assert np.shares_memory(feeds["past_key_0"], kv.keys[0])
    assert feeds["past_key_0"].flags.c_contiguous
    assert kv.feeds(0, 4, empty=True)["past_value_0"].shape == (4, 2, 0, 4)


def test_kv_buffers_follow_the_longest_row_not_the_capacity():
    """Graphs attend over every buffer position, so S grows with the rows and shrinks back."""
    kv = KVCache(HostMemory(), layers=1, batch=2, heads=2, capacity=1000, head_dim=4)
    assert kv.allocated == ALLOCATION_STEP
    rng = np.random.default_rng(1)
    present = {name: rng.normal(size=(2, 2, 90, 4)).astype(np.float32)
               for name in ("present_key_0", "present_value_0")}
    kv.commit(present, np.array([90, 30]))
    assert kv.allocated == allocation(90, 1000) and 90 < kv.allocated < 1000
    kv.commit(present, np.array([0, 60]))  # still fits: no copy
    assert kv.allocated == allocation(90, 1000)
    kv.commit(present, np.array([90, 0]))  # grown: the committed positions survive
    assert kv.allocated == allocation(180, 1000)
    np.testing.assert_array_equal(kv.keys[0][0, :, :90], present["present_key_0"][0])
    np.testing.assert_array_equal(kv.values[0][0, :, 90:180], present["present_value_0"][0])
    np.testing.assert_array_equal(kv.keys[0][1, :, 30:90], present["present_key_0"][1, :, :60])
    assert kv.feeds(0, 2)["past_key_0"].shape == (2, 2, kv.allocated, 4)
    kv.lengths[0] = 0  # the long row left
    kv.fit()
    assert kv.allocated == allocation(90, 1000)
    np.testing.assert_array_equal(kv.keys[0][1, :, 30:90], present["present_key_0"][1, :, :60])
    kv.fit()  # nothing more to shrink
    assert kv.allocated == allocation(90, 1000)
    assert allocation(10_000, 1000) == 1000


def test_select_tokens_follows_the_inverse_cdf_rule():
    from dspark_plugins.spec_verify.reference import inverse_cdf_sample, softmax

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32) * 3
    temperature = np.array([0.0, 1.0, 0.7, 1.5, -1.0, 1.0], dtype=np.float32)
    uniforms = rng.random(6).astype(np.float32)
    got = select_tokens(logits, temperature, uniforms)
    for b in range(6):
        if temperature[b] > 0:
            want = inverse_cdf_sample(softmax(logits[b] / temperature[b]), uniforms[b])
        else:
            want = np.argmax(logits[b])
        assert got[b] == want


def test_request_randomness_is_per_row_and_skips_finished_rows():
    rnd = RequestRandomness([7, 7, 9])
    first = rnd.draw(1, np.array([True, False, True]))
    assert first[1, 0] == 0.0
    second = rnd.draw(4, np.ones(3, dtype=bool))
    solo = np.random.default_rng(7)
    np.testing.assert_array_equal(first[0], np.float32(solo.random(1)))
    np.testing.assert_array_equal(second[0], solo.random(4).astype(np.float32))
    # row 1 did not draw before, so its first 4 draws are seed 7's first 4
    np.testing.assert_array_equal(second[1], np.random.default_rng(7).random(4).astype(np.float32))


def test_chat_template_and_stop_ids_match_transformers(tiny_export):
    from transformers import AutoTokenizer

    folder = tiny_export.parent / "runtime_tiny_target"
    ours, theirs = TextTokenizer(folder), AutoTokenizer.from_pretrained(folder)
    prompt = "t5 t6 t7"
    want = theirs.apply_chat_template([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True, tokenize=False)
    assert ours.render_chat(prompt) == want
    assert ours.encode_prompt(prompt, raw=True) == theirs.encode(prompt, add_special_tokens=False)
    assert 2 in ours.stop_ids


def _byte_tokenizer(tmp_path: Path) -> TextTokenizer:
    """Every byte its own token: multi-byte characters span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    return TextTokenizer(tmp_path)


def test_stream_decoder_never_emits_broken_utf8(tmp_path):
    tok = _byte_tokenizer(tmp_path)
    text = "héllo wörld 🙂 ok 日本"
    ids = tok.tokenizer.encode(text).ids
    assert len(ids) > len(text)  # multi-byte characters really are split
    stream: StreamDecoder = tok.stream()
    pieces = [stream.push([i]) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


# ---------------------------------------------------------------- the loop (tiny pair)

def _near_tie_or_equal(pair, prompt_ids: list[int], got: list[int], want: list[int]) -> None:
    """Equal token for token, except after a genuine near-tie of the target's top-2 logits."""
    import torch

    if got == want:
        return
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    assert i < min(len(got), len(want)), f"lengths differ without a mismatch: {got} vs {want}"
    ids = torch.tensor([prompt_ids + want[:i]])
    keys, values = pair.target.empty_cache(1, 0)
    with torch.no_grad():
        logits = pair.target(ids, torch.arange(ids.shape[1])[None], torch.tensor([0]),
                             torch.tensor([ids.shape[1]]), keys, values)[0][0, -1]
    top2 = torch.topk(logits, 2).values
    margin = float((top2[0] - top2[1]) / top2[0].abs().clamp_min(1e-6))
    assert margin < NEAR_TIE, f"token {i} differs at top-2 margin {margin:.2e}: {got} vs {want}"


def test_greedy_matches_reference_target_only(pipe, pair):
    from dspark_export.decode import generate_target_only

    for prompt in PROMPTS:
        ids = pipe.encode([prompt])[0]
        want = generate_target_only(pair.target, ids, max_new_tokens=MAX_NEW,
                                    stop_ids=pair.stop_ids()).tokens
        for target_only in (True, False):
            got = pipe.generate([prompt], max_new_tokens=MAX_NEW, target_only=target_only)
            _near_tie_or_equal(pair, ids, got.requests[0].token_ids, want)


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_sampling_matches_reference_speculative_token_for_token(pipe, pair, threshold):
    """Same seed, same draw order: identical tokens, acceptance record and tau."""
    from dspark_export.decode import generate_speculative
    from dspark_runtime.schedule import make_scheduler

    ids = pipe.encode([PROMPTS[0]])[0]
    schedule = "fixed" if threshold is None else "threshold"
    want = generate_speculative(pair.target, pair.drafter, ids, max_new_tokens=MAX_NEW,
                                temperature=1.0, seed=11, stop_ids=pair.stop_ids(),
                                scheduler=make_scheduler(schedule, gamma=pipe.gamma,
                                                         threshold=threshold or 0.5))
    got = pipe.generate([PROMPTS[0]], max_new_tokens=MAX_NEW, temperature=1.0, seed=11,
                        schedule=schedule, threshold=threshold)
    assert got.requests[0].token_ids == want.tokens
    assert got.requests[0].accepted == want.stats.accepted
    assert got.requests[0].verified == want.stats.verified
    assert got.tau == pytest.approx(want.stats.tau)
    assert got.tau > 1.0  # drafts were accepted: the multi-token commit path ran


def test_sampling_target_only_matches_reference(pipe, pair):
    from dspark_export.decode import generate_target_only

    ids = pipe.encode([PROMPTS[2]])[0]
    want = generate_target_only(pair.target, ids, max_new_tokens=MAX_NEW, temperature=0.8,
                                seed=5, stop_ids=pair.stop_ids()).tokens
    got = pipe.generate([PROMPTS[2]], max_new_tokens=MAX_NEW, temperature=0.8, seed=5,
                        target_only=True)
    assert got.requests[0].token_ids == want


def test_sampling_is_reproducible_and_seeded(pipe):
    runs = [pipe.generate([PROMPTS[1]], max_new_tokens=MAX_NEW, temperature=1.0, seed=s)
            for s in (3, 3, 4)]
    assert runs[0].requests[0].token_ids == runs[1].requests[0].token_ids
    assert runs[0].requests[0].token_ids != runs[2].requests[0].token_ids


@pytest.mark.parametrize("temperature,target_only", [(0.0, False), (1.0, False), (1.0, True)])
def test_batch_of_three_equals_each_alone(pipe, temperature, target_only):
    batch = pipe.generate(PROMPTS, max_new_tokens=MAX_NEW, temperature=temperature, seed=2,
                          target_only=target_only)
    for i, prompt in enumerate(PROMPTS):
        alone = pipe.generate([prompt], max_new_tokens=MAX_NEW, temperature=temperature, seed=2,
                              target_only=target_only)
        assert batch.requests[i].token_ids == alone.requests[0].token_ids
        assert batch.requests[i].accepted == alone.requests[0].accepted


class RecordingScheduler:
    """Verifies a different length per row and records what the loop handed in."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def verify_lengths(self, confidences: np.ndarray, active: np.ndarray) -> np.ndarray:
        self.calls.append((confidences.copy(), active.copy()))
        return np.where(active, np.arange(len(active)) % (confidences.shape[1] + 1), 0)

    def reset(self) -> None:
        self.calls.clear()


def test_scheduler_plumbing_and_per_row_verify_lengths(pipe):
    scheduler = RecordingScheduler()
    result = pipe.generate(PROMPTS, max_new_tokens=MAX_NEW, temperature=1.0, seed=1,
                           schedule=scheduler)
    confidences, active = scheduler.calls[0]
    assert confidences.shape == (3, pipe.gamma) and active.all()
    assert np.all((confidences >= 0) & (confidences <= 1))
    for row, out in enumerate(result.requests):
        assert set(out.verified) <= {0, row % (pipe.gamma + 1)}
        assert all(a <= v for a, v in zip(out.accepted, out.verified))
    assert result.requests[0].accepted == [0] * len(result.requests[0].accepted)  # verify 0


def test_stop_token_ends_a_row_and_is_kept(pipe):
    free = pipe.generate([PROMPTS[0]], max_new_tokens=MAX_NEW).requests[0].token_ids
    stop = free[5]
    saved = pipe.tokenizer.stop_ids
    pipe.tokenizer.stop_ids = frozenset({stop})
    try:
        out = pipe.generate([PROMPTS[0]], max_new_tokens=MAX_NEW).requests[0]
    finally:
        pipe.tokenizer.stop_ids = saved
    assert out.token_ids == free[:free.index(stop) + 1]
    assert out.finish_reason == "stop"


def test_context_limit_and_budget(pipe):
    short = pipe.generate([PROMPTS[0]], max_new_tokens=3).requests[0]
    assert len(short.token_ids) == 3 and short.finish_reason == "length"
    saved = pipe.context_limit
    pipe.context_limit = 12
    try:
        out = pipe.generate([PROMPTS[0]], max_new_tokens=100).requests[0]
    finally:
        pipe.context_limit = saved
    assert out.finish_reason == "context"
    assert out.prompt_length + len(out.token_ids) <= 12 + 1  # the last anchor needs no slot


def test_streaming_callback_concatenates_to_the_text(pipe):
    chunks: dict[int, list[str]] = {0: [], 1: [], 2: []}
    result = pipe.generate(PROMPTS, max_new_tokens=MAX_NEW, stream=lambda i, t: chunks[i].append(t))
    for i, out in enumerate(result.requests):
        assert "".join(chunks[i]) == out.text


def test_stats_cover_every_stage(pipe):
    result = pipe.generate([PROMPTS[0]], max_new_tokens=MAX_NEW)
    assert set(result.seconds) == {"prefill", "draft", "markov", "schedule", "target_verify",
                                   "spec_verify", "host"}
    assert all(v > 0 for v in result.seconds.values())
    assert 0 < result.host_overhead < 1 and result.tokens_per_s > 0
    json.dumps(result.to_dict(), allow_nan=False)


# ---------------------------------------------------------------- bad input, CLI

def test_bad_prompts_are_refused(pipe):
    from dspark_runtime.pipeline import PromptError

    with pytest.raises(PromptError, match="empty"):
        pipe.generate(["  "])
    with pytest.raises(PromptError, match="context limit"):
        pipe.generate([" ".join(["t5"] * 600)], raw=True)


def test_broken_bundles_are_refused(tiny_export, tmp_path):
    from dspark_runtime.bundle import BundleError
    from dspark_runtime.pipeline import Pipeline

    missing = shutil.copytree(tiny_export, tmp_path / "missing")
    (missing / "draft.onnx").unlink()
    with pytest.raises(BundleError, match="draft.onnx"):
        Pipeline.from_bundle(missing)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"format_version": "99"}))
    with pytest.raises(BundleError, match="format_version"):
        Pipeline.from_bundle(foreign)


def test_cli_run_streams_then_reports(tiny_export):
    from dspark_export.cli_run import run

    result = CliRunner().invoke(run, [str(tiny_export), "--prompt", PROMPTS[0],
                                      "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output and "tau" in result.output
    assert "schedule threshold" in result.output  # auto without an SPS table
    result = CliRunner().invoke(run, [str(tiny_export), "--prompt", PROMPTS[0], "--json",
                                      "--max-new-tokens", "8", "--temperature", "1"])
    payload = json.loads(result.output.strip().splitlines()[-1])
    assert {"text", "tau", "tokens_per_s", "stage_seconds"} <= set(payload)
    target_only = CliRunner().invoke(run, [str(tiny_export), "--prompt", PROMPTS[0], "--json",
                                           "--max-new-tokens", "8", "--target-only"])
    assert json.loads(target_only.output.strip().splitlines()[-1])["tau"] == 1.0


@pytest.mark.parametrize("args,message", [
    (["--prompt", " "], "empty"),
    (["--prompt", " ".join(["t5"] * 600), "--raw"], "context limit"),
])
def test_cli_run_errors(tiny_export, args, message):
    from dspark_export.cli_run import run

    result = CliRunner().invoke(run, [str(tiny_export), *args])
    assert result.exit_code == 1 and message in result.output
    assert "Traceback" not in result.output


def test_cli_run_refuses_a_missing_bundle(tmp_path):
    from dspark_export.cli_run import run

    result = CliRunner().invoke(run, [str(tmp_path / "nope"), "--prompt", "hi"])
    assert result.exit_code == 1 and "not a directory" in result.output


# ---------------------------------------------------------------- CUDA (skips without a GPU)

def _cuda() -> bool:
    from dspark_runtime.backends.onnxruntime import cuda_available

    return cuda_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs onnxruntime-gpu and a CUDA GPU: the CUDA "
                                        "provider is not offered here")
def test_cuda_path_matches_cpu_path(tiny_export):
    """Device-resident caches (IOBinding + device commits) give the CPU path's tokens."""
    from dspark_runtime.pipeline import Pipeline

    cuda, cpu = (Pipeline.from_bundle(tiny_export, backend=b) for b in ("cuda", "cpu"))
    assert all(r.on_device for r in cuda.runners.values())
    for case in (dict(), dict(temperature=1.0, seed=4), dict(temperature=1.0, target_only=True)):
        want = cpu.generate(PROMPTS, max_new_tokens=MAX_NEW, **case)
        got = cuda.generate(PROMPTS, max_new_tokens=MAX_NEW, **case)
        assert [r.token_ids for r in got.requests] == [r.token_ids for r in want.requests]


# ---------------------------------------------------------------- the reference pair

@pytest.fixture(scope="module")
def reference_export(tmp_path_factory) -> Path:
    from dspark_export.export import export_graphs
    from dspark_export.reference import reference_draft_dir, reference_target_dir

    return export_graphs(reference_target_dir(), reference_draft_dir(),
                         tmp_path_factory.mktemp("runtime_ref") / "export")


@pytest.mark.slow
def test_reference_pair_greedy_matches_pytorch_target_only(reference_export):
    from dspark_export.decode import generate_target_only
    from dspark_export.pair import load_pair
    from dspark_runtime.pipeline import Pipeline

    pair = load_pair()
    pipe = Pipeline.from_bundle(reference_export)
    for prompt in ["Explain recursion.", "What is 12 times 7?"]:
        ids = pipe.encode([prompt])[0]
        assert ids == pair.encode_prompt(prompt)
        want = generate_target_only(pair.target, ids, max_new_tokens=32,
                                    stop_ids=pair.stop_ids()).tokens
        for target_only in (True, False):
            got = pipe.generate([prompt], max_new_tokens=32, target_only=target_only)
            _near_tie_or_equal(pair, ids, got.requests[0].token_ids, want)


def test_draft_vocabulary_bundle_matches_the_restricted_reference(tiny_export, tmp_path):
    """A bundle drafting over 64 of 256 tokens: sampled output equals the PyTorch reference
    with the same restricted drafter token for token, and greedy stays the target's."""
    from dspark_export.decode import generate_speculative
    from dspark_export.export import export_graphs
    from dspark_export.models.draft_vocab import write_token_counts
    from dspark_export.pair import load_pair
    from dspark_runtime.pipeline import Pipeline

    root = tiny_export.parent
    draft = tmp_path / "draft"
    shutil.copytree(root / "runtime_tiny_draft", draft)
    tokens = np.random.default_rng(0).integers(3, 256, 5000) // 4  # ids 0..63 are frequent
    write_token_counts(draft, tokens, vocab_size=256, source="test")
    out = export_graphs(root / "runtime_tiny_target", draft, tmp_path / "export", draft_vocab=64)
    record = json.loads((out / "export.json").read_text())["draft_vocab"]
    assert record["size"] == 64 and record["coverage"] == pytest.approx(1.0)
    pipe = Pipeline.from_bundle(out, schedule="fixed")
    pair = load_pair(root / "runtime_tiny_target", draft, draft_vocab=64)
    assert pair.drafter.draft_vocab.tolist() == list(range(64))  # stop id 2 is among them
    ids = pipe.encode([PROMPTS[0]])[0]
    want = generate_speculative(pair.target, pair.drafter, ids, max_new_tokens=MAX_NEW,
                                temperature=1.0, seed=11, stop_ids=pair.stop_ids())
    got = pipe.generate([PROMPTS[0]], max_new_tokens=MAX_NEW, temperature=1.0, seed=11)
    assert got.requests[0].token_ids == want.tokens
    assert got.requests[0].accepted == want.stats.accepted
    greedy = pipe.generate(PROMPTS, max_new_tokens=MAX_NEW)
    alone = Pipeline.from_bundle(tiny_export).generate(PROMPTS, max_new_tokens=MAX_NEW,
                                                       target_only=True)
    for a, b in zip(greedy.requests, alone.requests):
        assert a.token_ids == b.token_ids


def test_pipeline_closes_its_runners(tiny_export):
    from dspark_runtime.pipeline import Pipeline

    with Pipeline.from_bundle(tiny_export) as pipe:
        assert pipe.generate(PROMPTS[:1], max_new_tokens=4).requests[0].token_ids
    with pytest.raises(RuntimeError, match="closed"):
        pipe.generate(PROMPTS[:1], max_new_tokens=4)
    pipe.close()  # idempotent

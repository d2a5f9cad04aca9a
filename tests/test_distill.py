"""Distillation: the prompt corpus, DeepSpec's objective and sampler, training = inference,
a short run that lowers the loss and writes a loadable DeepSpec checkpoint, resuming, errors,
and the GPU script's CPU path."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dspark_export import distill as distill_mod
from dspark_export.distill import (
    DistillError,
    Batch,
    block_terms,
    build_rows,
    distill,
    drafter_block_outputs,
    lr_at,
    sample_anchors,
    shard_weights,
    target_features,
    unshard_weights,
)
from dspark_export.distill_data import (
    DistillDataError,
    build_corpus,
    corpus_digest,
    load_prompts,
)
from dspark_export.distill_loss import TargetHead, block_loss, dspark_loss
from dspark_export.models.draft import load_drafter, make_random_drafter, save_drafter
from dspark_export.models.target import TargetAdapter

from conftest import make_tiny_target

EVAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "eval"
TINY = dict(tokens=160, max_response_tokens=12, batch_size=4, anchors=6, markov_rank=8,
            progress=False, check_features=False, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama target and one shared generation file (generated once)."""
    root = tmp_path_factory.mktemp("distill")
    target = make_tiny_target(root / "target", "llama")
    data_file = root / "data.npz"
    return {"root": root, "target": target, "data": data_file}


def _run(tiny, out, **overrides):
    kwargs = dict(TINY, data_file=tiny["data"])
    kwargs.update(overrides)
    return distill(tiny["target"], out, log=lambda *_: None, **kwargs)


# ----------------------------------------------------------------------------- corpus


def test_corpus_is_seeded_deduplicated_and_mixed():
    a, b = build_corpus(400, seed=3), build_corpus(400, seed=3)
    assert a == b and corpus_digest(a) == corpus_digest(b)
    assert corpus_digest(build_corpus(400, seed=4)) != corpus_digest(a)
    assert len(a) == 400 and len({p.text for p in a}) == 400
    counts = {d: sum(p.domain == d for p in a) for d in ("math", "code", "chat")}
    assert all(c > 60 for c in counts.values()), counts
    assert build_corpus(50, seed=3) == a[:50]  # a prefix of a larger corpus


def test_corpus_is_the_same_in_every_process():
    """No object addresses (`<... at 0x7f...>` defaults in signatures) leak into prompts."""
    code = ("from dspark_export.distill_data import build_corpus, corpus_digest; "
            "print(corpus_digest(build_corpus(3000, seed=0)))")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout.strip() for _ in range(2)}
    assert digests == {corpus_digest(build_corpus(3000, seed=0))}
    assert not any(" at 0x" in p.text for p in build_corpus(3000, seed=0))


@pytest.mark.skipif(not EVAL_DIR.is_dir(), reason="../shared/eval is not present")
def test_corpus_contains_no_evaluation_prompt():
    corpus = build_corpus(4000, seed=0) + build_corpus(2000, seed=0, mix={"code_tasks": 1.0})
    texts = {p.text for p in corpus}
    blob = "\n".join(texts)
    rng = np.random.default_rng(0)
    for name in ("gsm8k.jsonl", "humaneval.jsonl", "mt-bench.jsonl"):
        rows = [json.loads(line) for line in (EVAL_DIR / name).read_text().splitlines() if line]
        for i in rng.choice(len(rows), size=min(150, len(rows)), replace=False):
            turn = rows[i]["turns"][0]
            assert turn not in texts
            if name == "gsm8k.jsonl":  # the question itself, without the format instruction
                question = turn.split("\nPlease reason")[0]
                assert question[:80] not in blob, question
            elif name == "humaneval.jsonl":  # its signature and first docstring line
                lines = [line.strip().strip("\"'").strip() for line in turn.splitlines()[1:]]
                signature = next(line for line in lines if line.startswith("def "))
                doc = next((line for line in lines if len(line) >= 20 and not line.startswith(
                    ("def ", "from ", "import ", "```"))), signature)
                assert signature not in blob and doc[:60] not in blob, (signature, doc)
            else:
                assert turn[:60] not in blob, turn


def test_load_prompts_formats_and_refusals(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n{"turns": ["b", "c"]}\n\n{"prompt": "a"}\n')
    assert [p.text for p in load_prompts(jsonl)] == ["a", "b"]
    text = tmp_path / "p.txt"
    text.write_text("first line\n\nsecond line\n")
    assert [p.text for p in load_prompts(text)] == ["first line", "second line"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"nope": 1}\n')
    with pytest.raises(DistillDataError, match="bad.jsonl:2"):
        load_prompts(bad)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DistillDataError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")
    eval_file = tmp_path / "shared" / "eval" / "gsm8k.jsonl"
    eval_file.parent.mkdir(parents=True)
    eval_file.write_text('{"turns": ["q"]}\n')
    with pytest.raises(DistillDataError, match="evaluation"):
        load_prompts(eval_file)
    with pytest.raises(DistillDataError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------- objective


def _reference_loss(d, t, labels, mask, conf, ce_w, tv_w, conf_w, gamma):
    """DeepSpec's loss written element by element (loss.py), in float64."""
    num_ce = num_l1 = num_conf = den = 0.0
    rows, block, _ = d.shape
    for r in range(rows):
        for k in range(block):
            w = float(mask[r, k]) * math.exp(-k / gamma)
            p = torch.softmax(d[r, k].double(), -1)
            q = torch.softmax(t[r, k].double(), -1)
            l1 = float((p - q).abs().sum())
            acc = min(max(1 - 0.5 * l1, 0.0), 1.0)
            s = torch.sigmoid(conf[r, k].double())
            bce = -(acc * math.log(float(s)) + (1 - acc) * math.log(1 - float(s)))
            num_ce += w * -math.log(float(p[labels[r, k]]))
            num_l1 += w * l1
            num_conf += w * bce
            den += w
    return (ce_w * num_ce + tv_w * num_l1 + conf_w * num_conf) / (den + 1e-6)


def test_dspark_loss_matches_deepspec_formula():
    g = torch.Generator().manual_seed(0)
    rows, block, vocab = 5, 4, 11
    d = torch.randn(rows, block, vocab, generator=g) * 2
    t = torch.randn(rows, block, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (rows, block), generator=g)
    lengths = torch.tensor([4, 2, 0, 1, 3])
    mask = torch.arange(block)[None] < lengths[:, None]
    conf = torch.randn(rows, block, generator=g)
    loss, stats = dspark_loss(d, t, labels, mask, conf, ce_weight=0.1, tv_weight=0.9,
                              confidence_weight=1.0, loss_decay_gamma=4.0)
    expected = _reference_loss(d, t, labels, mask, conf, 0.1, 0.9, 1.0, 4.0)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert stats.blocks == 4 and stats.tokens == 10
    # the DFlash recipe: CE only, no confidence head
    loss, _ = dspark_loss(d, t, labels, mask, None, ce_weight=1.0, tv_weight=0.0,
                          confidence_weight=0.0)
    expected = _reference_loss(d, t, labels, mask, torch.zeros(rows, block), 1.0, 0.0, 0.0, 4.0)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_sample_anchors_follow_deepspec_sampler():
    loss_mask = torch.zeros(3, 20, dtype=torch.bool)
    loss_mask[0, 5:20] = True  # candidates 5..18 (a and a+1 in the response)
    loss_mask[1, 17:19] = True  # one candidate: 17
    g = torch.Generator().manual_seed(1)
    anchors, keep = sample_anchors(loss_mask, 6, g)
    assert keep.sum(1).tolist() == [6, 1, 0]
    row0 = anchors[0][keep[0]].tolist()
    assert row0 == sorted(set(row0)) and all(5 <= a <= 18 for a in row0)
    assert anchors[1][keep[1]].tolist() == [17]
    picked = torch.stack([sample_anchors(loss_mask[:1], 1, torch.Generator().manual_seed(s))[0]
                          for s in range(300)]).flatten()
    assert set(picked.tolist()) == set(range(5, 19))  # uniform over every candidate


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0.02, 1.0, 0.04) == pytest.approx(0.5)
    assert lr_at(0.04, 1.0, 0.04) == pytest.approx(1.0)
    assert lr_at(0.52, 1.0, 0.04) == pytest.approx(0.5)
    assert lr_at(1.0, 1.0, 0.04) == pytest.approx(0.0, abs=1e-12)


def _model_and_drafter(tiny, head, seed: int):
    """The tiny fp32 target, a random block-4 drafter with `head` (None: DFlash), its taps."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["target"], dtype=torch.float32).eval()
    layer_ids = [0, 2]
    drafter = make_random_drafter(model.config, block_size=4, target_layer_ids=layer_ids,
                                  markov_rank=0 if head is None else 8,
                                  markov_head_type=head or "vanilla", seed=seed)
    return model, drafter, layer_ids


@pytest.mark.parametrize("head", ["vanilla", "rnn", None])
def test_training_rows_equal_the_inference_path(tiny, head):
    """Packed training rows == adapter features + backbone + teacher-forced Markov steps."""
    model, drafter, layer_ids = _model_and_drafter(tiny, head, seed=1)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(10.0)
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    loss_mask[:, 9:] = True
    batch = Batch(ids, torch.ones_like(ids), loss_mask, np.arange(2))
    anchors, keep = sample_anchors(loss_mask, 8, torch.Generator().manual_seed(2))
    rows = build_rows(batch, anchors, keep, 4)
    with torch.no_grad():
        features, _ = target_features(model, ids, batch.attention_mask, layer_ids)
        out = drafter_block_outputs(drafter, features, ids, anchors, keep, rows)
        logits = out.hidden @ drafter.lm_head.weight.t()
        if out.w2_input is not None:
            logits = logits + out.w2_input @ drafter.markov_head.markov_w2.weight.t()
        confidence = out.confidence
    adapter = TargetAdapter(model, layer_ids)
    c = drafter.config
    for r in range(rows.seq.shape[0]):
        s, a = int(rows.seq[r]), int(rows.anchor[r])
        keys, values = adapter.empty_cache(1, 0)
        _, prefix, _, _ = adapter(ids[s:s + 1, :a], torch.arange(a)[None], torch.tensor([0]),
                                  torch.tensor([a]), keys, values)
        block = torch.full((1, 4), c.mask_token_id)
        block[0, 0] = ids[s, a]
        empty = torch.zeros(1, c.num_kv_heads, 0, c.head_dim)
        with torch.no_grad():
            hidden, base, _, _ = drafter.backbone(
                block, a + torch.arange(4)[None], prefix, torch.arange(a)[None],
                torch.tensor([a]), torch.tensor([0]), [empty], [empty])
            state = torch.zeros(1, 8)
            for k in range(int(rows.eval_mask[r].sum())):  # the supervised positions
                expected = base[:, k]
                prev = drafter.markov_head.prev_embeddings(ids[s, a + k][None]) \
                    if drafter.markov_head is not None else None
                if prev is not None:
                    e, state = drafter.markov_head.transition_input(prev, hidden[:, k], state)
                    bias = drafter.markov_head.markov_w2(e)
                    expected = expected + bias
                torch.testing.assert_close(logits[r, k], expected[0], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(confidence[r, k],
                                           drafter._confidence_logit(hidden[:, k], prev)[0],
                                           rtol=1e-4, atol=1e-4)
        n = int(rows.eval_mask[r].sum())
        assert n == min(4, ids.shape[1] - 1 - a) and n >= 1
        assert rows.labels[r, :n].tolist() == ids[s, a + 1:a + 1 + n].tolist()


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn", None])
def test_fused_head_loss_equals_the_plain_loss_and_its_gradients(tiny, head):
    """block_terms (chunked, recomputing backward) == dspark_loss on materialised logits."""
    model, drafter, layer_ids = _model_and_drafter(tiny, head, seed=3)
    drafter.set_target_weights(model.get_input_embeddings(), model.get_output_embeddings())
    drafter.lm_head.requires_grad_(False)
    ids = torch.randint(3, 256, (3, 20), generator=torch.Generator().manual_seed(4))
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    loss_mask[:, 6:] = True
    batch = Batch(ids, torch.ones_like(ids), loss_mask, np.arange(3))
    anchors, keep = sample_anchors(loss_mask, 6, torch.Generator().manual_seed(5))
    rows = build_rows(batch, anchors, keep, 4)
    with torch.no_grad():
        features, last = target_features(model, ids, batch.attention_mask, layer_ids)

    def loss_and_grads(fused: bool):
        drafter.zero_grad(set_to_none=True)
        out = drafter_block_outputs(drafter, features, ids, anchors, keep, rows)
        if fused:
            ce, l1, match = block_terms(drafter, out, last, rows)
            loss, stats = block_loss(ce, l1, match, rows.eval_mask, out.confidence)
        else:
            logits = out.hidden @ drafter.lm_head.weight.t()
            if out.w2_input is not None:
                logits = logits + out.w2_input @ drafter.markov_head.markov_w2.weight.t()
            target = model.lm_head(last[rows.seq[:, None], rows.pred_index])
            loss, stats = dspark_loss(logits, target, rows.labels, rows.eval_mask,
                                      out.confidence)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in drafter.named_parameters() if p.grad is not None}
        return float(loss.detach()), stats, grads

    fused_loss, fused_stats, fused_grads = loss_and_grads(True)
    plain_loss, plain_stats, plain_grads = loss_and_grads(False)
    assert fused_loss == pytest.approx(plain_loss, rel=1e-5)
    assert fused_stats.tau_greedy == plain_stats.tau_greedy
    assert fused_stats.tv_sum == pytest.approx(plain_stats.tv_sum, rel=1e-5)
    assert set(fused_grads) == set(plain_grads) and "fc.weight" in fused_grads
    if head is not None:
        assert "markov_head.markov_w2.weight" in fused_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("compiled", [False, True])
def test_target_head_keeps_the_full_softmax_on_the_draft_vocabulary(compiled):
    """q on the scored tokens is softmax over ALL tokens; rest is the mass left outside."""
    gen = torch.Generator().manual_seed(6)
    weight, hidden = torch.randn(50, 8, generator=gen), torch.randn(7, 8, generator=gen)
    full = torch.softmax(hidden @ weight.t(), dim=-1)
    vocab = torch.tensor([1, 4, 9, 30, 49])
    head = TargetHead(weight, vocab)
    got = head.distributions(hidden, chunk=3, compiled=compiled)
    torch.testing.assert_close(got.probs, full[:, vocab])
    torch.testing.assert_close(got.rest, 1 - full[:, vocab].sum(-1))
    argmax = full.argmax(-1)
    local = {int(t): i for i, t in enumerate(vocab)}
    assert got.top.tolist() == [local.get(int(t), -1) for t in argmax]
    whole = TargetHead(weight).distributions(hidden)
    torch.testing.assert_close(whole.probs, full)
    assert whole.top.tolist() == argmax.tolist() and float(whole.rest.abs().max()) == 0.0


def test_feature_cache_is_what_its_estimate_says(tiny):
    """Kept in the compute dtype (autocast leaves the residual stream fp32), same values as a
    direct pass up to that rounding."""
    from transformers import AutoModelForCausalLM

    from dspark_export.distill_data import load_data
    from dspark_export.distill_teacher import FeatureCache

    if not tiny["data"].is_file():
        _run(tiny, tiny["root"] / "make-data", steps=1)
    data = load_data(tiny["data"])
    model = AutoModelForCausalLM.from_pretrained(tiny["target"], dtype=torch.float32).eval()
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    cache = FeatureCache.build(model, data, [0, 2], amp, torch.bfloat16)
    assert cache.features.dtype == cache.last.dtype == torch.bfloat16
    width = model.config.hidden_size
    assert cache.features.nbytes + cache.last.nbytes == \
        FeatureCache.nbytes(data, 2 * width, width, torch.bfloat16)
    seq = torch.from_numpy(data.sequence(0).astype(np.int64))[None]
    with amp():
        features, last = target_features(model, seq, torch.ones_like(seq), [0, 2])
    got, got_last = cache.batch([0], seq.shape[1])
    torch.testing.assert_close(got.float(), features.to(torch.bfloat16).float())
    torch.testing.assert_close(got_last.float(), last.to(torch.bfloat16).float())


# ----------------------------------------------------------------------------- training runs


def test_distill_lowers_loss_and_writes_a_loadable_deepspec_checkpoint(tiny):
    out = _run(tiny, tiny["root"] / "run", steps=24, check_features=True)
    record = json.loads((out / "training.json").read_text())
    history = record["heldout"]["per_epoch"]
    assert history[0]["step"] == 0
    assert record["heldout"]["final"]["loss"] < 0.9 * history[0]["loss"]
    assert record["training"]["steps"] == 24
    assert record["data"]["response_tokens"] >= TINY["tokens"]
    assert record["objective"]["ce_weight"] == 0.1 and record["objective"]["tv_weight"] == 0.9
    assert not (out / ".checkpoints").exists()
    # DeepSpec format: its config fields, fp16 tensors, no embeddings / lm_head
    from safetensors.torch import load_file

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"] and config["block_size"] == 7
    assert config["markov_rank"] == 8 and config["enable_confidence_head"] is True
    tensors = load_file(out / "model.safetensors")
    assert "embed_tokens.weight" not in tensors and "lm_head.weight" not in tensors
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(tiny["target"], dtype=torch.float32)
    drafter = load_drafter(out, target.config, target.get_input_embeddings(),
                           target.get_output_embeddings())
    assert drafter.config.target_layer_ids == record["drafter"]["target_layer_ids"]


def test_distill_for_a_draft_vocabulary_records_it_and_deploys_it(tiny):
    """--draft-vocab: trained over the chosen tokens, token counts saved, the same vocabulary
    rebuilt when the pair is loaded with that size."""
    from dspark_export.models.draft_vocab import (
        TOKEN_COUNTS_NAME,
        read_token_counts,
        select_draft_vocab,
        trained_draft_vocab,
    )
    from dspark_export.pair import load_pair

    out = _run(tiny, tiny["root"] / "vocab", steps=24, draft_vocab=40)
    record = json.loads((out / "training.json").read_text())
    assert record["heldout"]["final"]["loss"] < 0.9 * record["heldout"]["per_epoch"][0]["loss"]
    assert record["drafter"]["trained_for_draft_vocab"]["size"] == 40
    assert 0 < record["drafter"]["trained_for_draft_vocab"]["coverage"] <= 1
    assert trained_draft_vocab(out) == 40 and (out / TOKEN_COUNTS_NAME).is_file()
    pair = load_pair(tiny["target"], out, draft_vocab=40)
    counts = read_token_counts(out, pair.drafter.config.vocab_size)
    assert pair.drafter.draft_vocab.tolist() == \
        select_draft_vocab(counts, 40, pair.stop_ids()).tolist()
    with pytest.raises(DistillError, match="draft_vocab"):
        _run(tiny, tiny["root"] / "bad-vocab", steps=2, draft_vocab=-1)


def test_init_continues_training_from_an_earlier_drafter(tiny):
    """--init: the run starts where the earlier drafter ended (its initial held-out loss is the
    earlier final one), records the lineage, and refuses another architecture by field."""
    first = _run(tiny, tiny["root"] / "first", steps=12)
    earlier = json.loads((first / "training.json").read_text())
    out = _run(tiny, tiny["root"] / "second", steps=6, init_from=first)
    record = json.loads((out / "training.json").read_text())
    start = record["heldout"]["per_epoch"][0]
    assert start["step"] == 0
    assert start["loss"] == pytest.approx(earlier["heldout"]["final"]["loss"], rel=1e-3)
    assert start["loss"] < 0.9 * earlier["heldout"]["per_epoch"][0]["loss"]
    lineage = record["drafter"]["init_from"]
    assert lineage["dir"] == str(first.resolve())
    assert lineage["training"]["steps"] == 12
    assert lineage["files"]["model.safetensors"] == \
        earlier["drafter"]["files"]["model.safetensors"]
    with pytest.raises(DistillError, match="markov_rank is 8.*trains 4"):
        _run(tiny, tiny["root"] / "other", steps=2, markov_rank=4, init_from=first)
    from dspark_export.models.draft import DraftError

    with pytest.raises(DraftError, match="drafter config not found"):  # before any work
        _run(tiny, tiny["root"] / "no-init", steps=2, init_from=tiny["root"] / "missing")
    assert not (tiny["root"] / "no-init").exists()


def test_resume_continues_from_the_checkpoint(tiny, monkeypatch):
    reference = _run(tiny, tiny["root"] / "straight", steps=8, checkpoint_every=3)
    calls = {"n": 0}
    original = distill_mod._train_step

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    out = tiny["root"] / "resumed"
    monkeypatch.setattr(distill_mod, "_train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, out, steps=8, checkpoint_every=3)
    monkeypatch.setattr(distill_mod, "_train_step", original)
    assert sorted(p.name for p in (out / ".checkpoints").iterdir()) == [
        "step-00000003.pt", "step-00000006.pt"]
    messages = []
    distill(tiny["target"], out, log=messages.append,
            **dict(TINY, data_file=tiny["data"], steps=8, checkpoint_every=3))
    assert any("at step 6/8" in m for m in messages), messages
    record = json.loads((out / "training.json").read_text())
    assert record["training"]["steps"] == 8
    from safetensors.torch import load_file

    a, b = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    for name in a:  # an interrupted and resumed run ends where an uninterrupted one does
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    # a finished folder is not silently replaced; other settings do not resume a checkpoint
    with pytest.raises(DistillError, match="finished drafter"):
        _run(tiny, out, steps=8)
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(distill_mod, "_train_step", interrupted)
        calls["n"] = 0
        _run(tiny, tiny["root"] / "other", steps=8, checkpoint_every=3)
    monkeypatch.setattr(distill_mod, "_train_step", original)
    with pytest.raises(DistillError, match="different settings"):
        _run(tiny, tiny["root"] / "other", steps=9, checkpoint_every=3)


@pytest.mark.parametrize("overrides, message", [
    (dict(block_size=1), "block_size"),
    (dict(markov_rank=-1), "markov_rank"),
    (dict(markov_head_type="lstm"), "markov_head_type"),
    (dict(steps=0), "steps"),
    (dict(steps=5, epochs=1.0), "steps or epochs"),
    (dict(tokens=0), "tokens"),
    (dict(confidence_weight=0.0), "confidence_weight"),
    (dict(ce_weight=0.0, tv_weight=0.0), "nothing trains"),
    (dict(device="tpu"), "device"),
    (dict(target_layer_ids=[0, 3]), "last layer"),
    (dict(target_layer_ids=[2, 1]), "increasing"),
    (dict(train_time_budget_s=0), "train_time_budget_s"),
    (dict(mix={"cod": 1.0}), "mix must give"),
    (dict(mix={"code": 1.0}, prompts_file="p.txt"), "built-in corpus"),
])
def test_bad_arguments_raise_clear_errors(tiny, tmp_path, overrides, message):
    with pytest.raises(DistillError, match=message):
        _run(tiny, tmp_path / "out", steps=overrides.pop("steps", 2), **overrides)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_bad_folders_raise_clear_errors(tiny, tmp_path):
    with pytest.raises(DistillError, match="no config.json"):
        distill(tmp_path / "nowhere", tmp_path / "out", **TINY)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DistillError, match="already holds files"):
        _run(tiny, foreign, steps=2)
    with pytest.raises(DistillError, match="not written by distill"):
        _run(tiny, foreign, steps=2, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_cli_errors_and_dflash_recipe(tiny, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from dspark_export.cli_distill import distill as command

    runner = CliRunner()
    result = runner.invoke(command, ["--target", str(tiny["target"]), "--out", str(tmp_path / "o"),
                                     "--target-layer-ids", "0,3", "--steps", "1", "--quiet"])
    assert result.exit_code != 0 and "last layer" in result.output
    result = runner.invoke(command, ["--out", str(tmp_path / "o"), "--steps", "1",
                                     "--epochs", "1"])
    assert result.exit_code != 0 and "not both" in result.output
    seen = {}
    monkeypatch.setattr(distill_mod, "distill", lambda *a, **k: seen.update(k) or tmp_path)
    result = runner.invoke(command, ["--target", str(tiny["target"]), "--out",
                                     str(tmp_path / "o"), "--dflash"])
    assert result.exit_code == 0, result.output
    assert (seen["markov_rank"], seen["confidence_head"], seen["ce_weight"],
            seen["tv_weight"]) == (0, False, 1.0, 0.0)
    result = runner.invoke(command, ["--out", str(tmp_path / "o"), "--mix",
                                     "code_tasks=0.6,math=0.4"])
    assert result.exit_code == 0 and seen["mix"] == {"code_tasks": 0.6, "math": 0.4}
    result = runner.invoke(command, ["--out", str(tmp_path / "o"), "--mix", "code_tasks"])
    assert result.exit_code != 0 and "SOURCE=WEIGHT" in result.output


def test_shards_load_and_gpu_script_cpu_path(tiny, tmp_path):
    """tools/gpu_distill.py end to end on CPU, with sharding forced below the drafter size."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gpu_distill", root / "tools" / "gpu_distill.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.MAX_FILE_BYTES = 100_000  # the tiny DSpark drafter is ~150 kB: forces shards + tar
    out = tmp_path / "out"
    argv = ["--target", str(tiny["target"]), "--out", str(out), "--work", str(tmp_path / "w"),
            "--device", "cpu", "--tokens", "60", "--max-response-tokens", "8", "--gen-batch", "8",
            "--steps", "2", "--batch-size", "2", "--anchors", "4"]
    assert script.main(argv) == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8 and all((out / f).stat().st_size <= 100_000 for f in files), files
    assert "gpu_distill.log" in files
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny["target"])
    shape = (config.vocab_size, config.hidden_size)
    ranks = {}
    for name in ("dspark", "dflash"):  # each comes back as a folder or as a (split) tar
        parts = sorted(out.glob(f"{name}.tar*"), key=lambda p: int(p.suffix[5:] or 0)
                       if p.suffix.startswith(".part") else -1)
        assert (out / name).is_dir() != bool(parts), files
        if parts:
            (tmp_path / f"{name}.tar").write_bytes(b"".join(p.read_bytes() for p in parts))
            with tarfile.open(tmp_path / f"{name}.tar") as tar:
                tar.extractall(tmp_path / "unpacked", filter="data")
        folder = out / name if (out / name).is_dir() else tmp_path / "unpacked" / name
        drafter = load_drafter(folder, config, torch.zeros(shape), torch.zeros(shape))
        ranks[name] = drafter.config.markov_rank
    assert ranks == {"dspark": 64, "dflash": 0}
    assert any(f.endswith(".tar.part1") for f in files), files  # a tar was split to fit
    log = (out / "gpu_distill.log").read_text()
    assert "DSpark / DFlash" in log and "check: dflash loads" in log


def test_shard_weights_round_trip(tmp_path):
    from transformers import Qwen3Config

    config = Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         vocab_size=300)
    drafter = make_random_drafter(config, target_layer_ids=[0, 2], markov_rank=16)
    out = save_drafter(drafter, tmp_path / "d")
    shards = shard_weights(out, 40_000)
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    loaded = load_drafter(out, config, drafter.embed_tokens, drafter.lm_head)
    for (name, a), (_, b) in zip(drafter.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    single = unshard_weights(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_drafter(out, config, drafter.embed_tokens, drafter.lm_head)
    for (name, a), (_, b) in zip(drafter.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert single == out / "model.safetensors"

"""The DSpark drafter: DeepSpec checkpoints in and out, backbone and Markov stage numerics.

The references below are written from DeepSpec's code (qwen3/modeling.py, markov_head.py,
common.py) as plain functions over a state dict keyed by DeepSpec's tensor names, so they
share nothing with the module under test but the weights.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from dspark_export.models.draft import (
    DraftError,
    DSparkConfig,
    default_target_layer_ids,
    load_drafter,
    make_random_drafter,
    save_drafter,
)
from dspark_export.models.markov import inverse_cdf_sample

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 64, 4, 2, 16, 96
VOCAB, TARGET_LAYERS, DRAFT_LAYERS, BLOCK = 160, 6, 2, 5
LAYER_IDS = [0, 2, 4]
ROPE_THETA = 10000.0
EPS = 1e-6


def target_config(**overrides) -> Qwen3Config:
    fields = dict(
        hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=TARGET_LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        vocab_size=VOCAB, rope_theta=ROPE_THETA, rms_norm_eps=EPS,
    )
    fields.update(overrides)
    return Qwen3Config(**fields)


def drafter(head_type: str = "vanilla", rank: int = 8, **kwargs):
    """A tiny random drafter with weights large enough that every branch changes outputs."""
    model = make_random_drafter(
        target_config(), num_layers=DRAFT_LAYERS, block_size=BLOCK, target_layer_ids=LAYER_IDS,
        markov_rank=rank, markov_head_type=head_type, **kwargs,
    )
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.3 * noise)
    return model


def deepspec_config(**overrides) -> dict:
    """config.json as DeepSpec's build_draft_config writes it for a Qwen3 target."""
    raw = {
        "architectures": ["Qwen3DSparkModel"], "model_type": "qwen3",
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
        "hidden_act": "silu", "rms_norm_eps": EPS, "rope_theta": ROPE_THETA,
        "rope_scaling": None, "max_position_embeddings": 4096, "attention_bias": True,
        "torch_dtype": "bfloat16", "tie_word_embeddings": False,
        "num_target_layers": TARGET_LAYERS, "num_hidden_layers": DRAFT_LAYERS,
        "block_size": BLOCK, "layer_types": ["full_attention"] * DRAFT_LAYERS,
        "mask_token_id": VOCAB - 3, "target_layer_ids": LAYER_IDS, "num_anchors": 512,
        "enable_confidence_head": True, "confidence_head_with_markov": True,
        "markov_rank": 8, "markov_head_type": "gated", "some_future_field": {"kept": 1},
    }
    raw.update(overrides)
    return raw


def deepspec_tensors(raw: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under DeepSpec's names and shapes (embeddings and lm_head excluded)."""
    d, r, v = raw["hidden_size"], raw["markov_rank"], raw["vocab_size"]
    q, kv = raw["num_attention_heads"] * HEAD_DIM, raw["num_key_value_heads"] * HEAD_DIM
    shapes = {"fc.weight": [d, len(raw["target_layer_ids"]) * d], "hidden_norm.weight": [d],
              "norm.weight": [d]}
    for i in range(raw["num_hidden_layers"]):
        p = f"layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": [q, d], p + "self_attn.k_proj.weight": [kv, d],
            p + "self_attn.v_proj.weight": [kv, d], p + "self_attn.o_proj.weight": [d, q],
            p + "self_attn.q_norm.weight": [HEAD_DIM], p + "self_attn.k_norm.weight": [HEAD_DIM],
            p + "mlp.gate_proj.weight": [INTER, d], p + "mlp.up_proj.weight": [INTER, d],
            p + "mlp.down_proj.weight": [d, INTER], p + "input_layernorm.weight": [d],
            p + "post_attention_layernorm.weight": [d],
        })
        if raw["attention_bias"]:
            shapes.update({p + "self_attn.q_proj.bias": [q], p + "self_attn.k_proj.bias": [kv],
                           p + "self_attn.v_proj.bias": [kv], p + "self_attn.o_proj.bias": [d]})
    if r > 0:
        shapes.update({"markov_head.markov_w1.weight": [v, r],
                       "markov_head.markov_w2.weight": [v, r]})
        if raw["markov_head_type"] == "gated":
            shapes.update({"markov_head.gate_proj.weight": [r, d + r],
                           "markov_head.gate_proj.bias": [r]})
        if raw["markov_head_type"] == "rnn":
            shapes.update({"markov_head.joint_proj.weight": [3 * r, 2 * r + d],
                           "markov_head.joint_proj.bias": [3 * r]})
    if raw["enable_confidence_head"]:
        width = d + (r if raw["confidence_head_with_markov"] else 0)
        shapes.update({"confidence_head.proj.weight": [1, width], "confidence_head.proj.bias": [1]})
    generator = torch.Generator().manual_seed(seed)
    return {name: 0.3 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def write_checkpoint(path: Path, raw: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


# ---- DeepSpec reference (training forward: all context at once, flex-attention mask) --------


def rms(x, weight):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def rope(x, positions):
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    half = HEAD_DIM // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def lin(sd, name, x):
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def reference_backbone(sd, input_ids, target_hidden, anchors, mask_token_id):
    """DeepSpec `forward` -> `_forward_backbone` for blocks at `anchors` [B, nb]; returns h."""
    bsz, seq = input_ids.shape
    nb = anchors.shape[1]
    noise_ids = torch.full((bsz, nb * BLOCK), mask_token_id)
    noise_ids[:, ::BLOCK] = torch.gather(input_ids, 1, anchors)
    h = F.embedding(noise_ids, sd["embed_tokens.weight"])
    ctx = rms(F.linear(target_hidden, sd["fc.weight"]), sd["hidden_norm.weight"])
    block_pos = (anchors[..., None] + torch.arange(BLOCK)).reshape(bsz, -1)
    positions = torch.cat([torch.arange(seq).expand(bsz, -1), block_pos], dim=1)
    q_idx = torch.arange(nb * BLOCK)[:, None]
    kv_idx = torch.arange(seq + nb * BLOCK)[None, :]
    anchor_of_q = anchors[:, q_idx // BLOCK]  # [B, Q, 1]
    allowed = ((kv_idx < seq) & (kv_idx < anchor_of_q)) | (
        (kv_idx >= seq) & ((kv_idx - seq) // BLOCK == q_idx // BLOCK))
    q_len = nb * BLOCK
    for i in range(DRAFT_LAYERS):
        p = f"layers.{i}."
        x = rms(h, sd[p + "input_layernorm.weight"])
        q = lin(sd, p + "self_attn.q_proj", x).view(bsz, q_len, HEADS, HEAD_DIM)
        q = rms(q, sd[p + "self_attn.q_norm.weight"]).transpose(1, 2)
        k = torch.cat([lin(sd, p + "self_attn.k_proj", ctx), lin(sd, p + "self_attn.k_proj", x)], 1)
        v = torch.cat([lin(sd, p + "self_attn.v_proj", ctx), lin(sd, p + "self_attn.v_proj", x)], 1)
        k = rms(k.view(bsz, -1, KV_HEADS, HEAD_DIM), sd[p + "self_attn.k_norm.weight"])
        k = k.transpose(1, 2)
        v = v.view(bsz, -1, KV_HEADS, HEAD_DIM).transpose(1, 2)
        q, k = rope(q, positions[:, -q_len:]), rope(k, positions)
        k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
        v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
        scores = q @ k.transpose(2, 3) / math.sqrt(HEAD_DIM)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(bsz, q_len, -1)
        h = h + lin(sd, p + "self_attn.o_proj", attn)
        y = rms(h, sd[p + "post_attention_layernorm.weight"])
        gate, up = lin(sd, p + "mlp.gate_proj", y), lin(sd, p + "mlp.up_proj", y)
        h = h + lin(sd, p + "mlp.down_proj", F.silu(gate) * up)
    return rms(h, sd["norm.weight"])


def reference_markov(sd, raw, base_logits, hidden, anchors, temperature, uniforms):
    """markov_head.py's sample_block_tokens + predict_confidence_step, one row at a time,
    with torch.multinomial replaced by the graph contract's inverse CDF (via searchsorted)."""
    rank = raw["markov_rank"]
    head = raw.get("markov_head_type") if rank else None
    ids, probs, confs = [], [], []
    for b in range(base_logits.shape[0]):
        prev, state = int(anchors[b]), torch.zeros(rank)
        for k in range(base_logits.shape[1]):
            h, logits = hidden[b, k], base_logits[b, k].clone()
            emb = sd["markov_head.markov_w1.weight"][prev] if rank else None
            if head == "vanilla":
                logits += sd["markov_head.markov_w2.weight"] @ emb
            elif head == "gated":
                gate = torch.sigmoid(lin(sd, "markov_head.gate_proj", torch.cat([h, emb])))
                logits += sd["markov_head.markov_w2.weight"] @ (gate * emb)
            elif head == "rnn":
                proj = lin(sd, "markov_head.joint_proj", torch.cat([state, emb, h]))
                g, c, o = torch.sigmoid(proj[:rank]), proj[rank:2 * rank], proj[2 * rank:]
                state = g * state + (1 - g) * torch.tanh(c)
                logits += sd["markov_head.markov_w2.weight"] @ torch.tanh(o)
            if not raw["enable_confidence_head"]:
                confs.append(30.0)
            else:
                feats = torch.cat([h, emb]) if raw["confidence_head_with_markov"] else h
                confs.append(float(lin(sd, "confidence_head.proj", feats)))
            if temperature[b] <= 0:
                token = int(torch.argmax(logits))
                p = F.one_hot(torch.tensor(token), logits.numel()).float()
            else:
                p = torch.softmax(logits / temperature[b], dim=-1)
                cdf = torch.cumsum(p, 0)
                token = min(int(torch.searchsorted(cdf, uniforms[b, k] * cdf[-1], right=True)),
                            logits.numel() - 1)
            ids.append(token)
            probs.append(p)
            prev = token
    shape = base_logits.shape[:2]
    return (torch.tensor(ids).view(shape), torch.stack(probs).view(*shape, -1),
            torch.tensor(confs).view(shape))


def empty_cache(batch: int):
    return [torch.zeros(batch, KV_HEADS, 0, HEAD_DIM) for _ in range(DRAFT_LAYERS)]


def block_inputs(input_ids, anchors, mask_token_id=VOCAB - 1):
    """block_ids / block_positions for one anchor per row, as the runtime builds them."""
    ids = torch.full((input_ids.shape[0], BLOCK), mask_token_id)
    ids[:, 0] = torch.gather(input_ids, 1, anchors[:, None])[:, 0]
    return ids, anchors[:, None] + torch.arange(BLOCK)


# ---- backbone -------------------------------------------------------------------------------


@torch.no_grad()
def test_cached_backbone_matches_one_shot_deepspec_forward():
    model = drafter("rnn")
    torch.manual_seed(0)
    batch, seq = 2, 12
    features = torch.randn(batch, seq, model.config.feature_size)
    input_ids = torch.randint(0, VOCAB, (batch, seq))
    first, second = torch.tensor([3, 2]), torch.tensor([9, 6])
    ref = reference_backbone(model.state_dict(), input_ids, features,
                             torch.stack([first, second], 1), VOCAB - 1).view(batch, 2, BLOCK, -1)

    # Call 1: context 0..first-1 (row 1 right-padded with garbage), empty cache.
    pad = int(first.max())
    positions = torch.arange(pad).expand(batch, -1)
    ids, block_pos = block_inputs(input_ids, first)
    h1, logits1, keys1, values1 = model.backbone(
        ids, block_pos, features[:, :pad], positions, first, torch.zeros(batch, dtype=torch.long),
        empty_cache(batch), empty_cache(batch))
    torch.testing.assert_close(h1, ref[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits1, h1 @ model.lm_head.weight.T)

    # The runtime commits the valid prefix of each row into a larger buffer full of junk.
    keys = [torch.randn(batch, KV_HEADS, 8, HEAD_DIM) * 50 for _ in range(DRAFT_LAYERS)]
    values = [torch.randn(batch, KV_HEADS, 8, HEAD_DIM) * 50 for _ in range(DRAFT_LAYERS)]
    for layer in range(DRAFT_LAYERS):
        for row in range(batch):
            n = int(first[row])
            keys[layer][row, :, :n] = keys1[layer][row, :, :n]
            values[layer][row, :, :n] = values1[layer][row, :, :n]

    # Call 2: context first..second-1 per row, padded to the longest row.
    new_len = second - first
    width = int(new_len.max())
    gather = (first[:, None] + torch.arange(width)).clamp(max=seq - 1)
    ctx = torch.gather(features, 1, gather[..., None].expand(-1, -1, features.shape[-1]))
    ids, block_pos = block_inputs(input_ids, second)
    h2, _, keys2, _ = model.backbone(ids, block_pos, ctx, gather, new_len, first, keys, values)
    torch.testing.assert_close(h2, ref[:, 1], rtol=1e-4, atol=1e-4)

    # New keys are positioned: the same as computing the whole context at once.
    all_keys, _ = model.context_kv(features, torch.arange(seq).expand(batch, -1))
    for row in range(batch):
        span = slice(int(first[row]), int(second[row]))
        torch.testing.assert_close(keys2[0][row, :, : int(new_len[row])], all_keys[0][row, :, span])


# ---- Markov stage ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head_type,rank,confidence,with_markov",
    [("vanilla", 8, True, True), ("gated", 8, True, True), ("rnn", 8, True, False),
     ("rnn", 8, False, False), ("vanilla", 0, True, False), ("vanilla", 0, False, False)],
)
@torch.no_grad()
def test_markov_sample_matches_deepspec_heads(head_type, rank, confidence, with_markov):
    model = drafter(head_type, rank, confidence=confidence, confidence_with_markov=with_markov)
    torch.manual_seed(1)
    batch = 4
    base = torch.randn(batch, BLOCK, VOCAB) * 2
    hidden = torch.randn(batch, BLOCK, HIDDEN)
    anchors = torch.randint(0, VOCAB, (batch,))
    temperature = torch.tensor([0.0, 1.0, 0.7, -1.0])
    uniforms = torch.rand(batch, BLOCK)
    ids, probs, conf = model.markov_sample(base, hidden, anchors, temperature, uniforms)
    ref_ids, ref_probs, ref_conf = reference_markov(
        model.state_dict(), model.config.raw, base, hidden, anchors, temperature, uniforms)
    assert ids.dtype == torch.int64 and probs.dtype == conf.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conf, ref_conf, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_markov_head_changes_the_draft():
    """Guard against a head that is silently skipped: the bias must move some tokens."""
    with_head, without = drafter("vanilla", 8), drafter("vanilla", 0)
    base = torch.randn(3, BLOCK, VOCAB, generator=torch.Generator().manual_seed(2))
    hidden, anchors = torch.randn(3, BLOCK, HIDDEN), torch.tensor([1, 2, 3])
    args = (base, hidden, anchors, torch.zeros(3), torch.rand(3, BLOCK))
    assert not torch.equal(with_head.markov_sample(*args)[0], without.markov_sample(*args)[0])


def test_inverse_cdf_sample_rule():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]] * 5)
    u = torch.tensor([0.0, 0.2499, 0.25, 0.9999, 1.0])
    # u * sum lands below cdf[1]=0.25 -> token 1; at 0.25 it counts index 1 -> token 3;
    # u = 1 counts every entry and is clamped to V - 1.
    assert inverse_cdf_sample(probs, u).tolist() == [1, 1, 3, 3, 4]
    unnormalised = torch.tensor([[2.0, 6.0]])
    assert inverse_cdf_sample(unnormalised, torch.tensor([0.3])).tolist() == [1]
    grid = (torch.arange(1000) + 0.5) / 1000
    p = torch.softmax(torch.randn(7, generator=torch.Generator().manual_seed(3)), 0)
    counts = torch.bincount(inverse_cdf_sample(p.expand(1000, -1), grid), minlength=7)
    assert (counts - p * 1000).abs().max() <= 1.0


# ---- checkpoints ----------------------------------------------------------------------------


@torch.no_grad()
def test_raw_deepspec_checkpoint_loads_and_reproduces_reference(tmp_path):
    raw = deepspec_config()
    tensors = deepspec_tensors(raw)
    write_checkpoint(tmp_path / "draft", raw, tensors)
    generator = torch.Generator().manual_seed(5)
    embed = torch.randn(VOCAB, HIDDEN, generator=generator)
    head = torch.randn(VOCAB, HIDDEN, generator=generator) * 0.3
    model = load_drafter(tmp_path / "draft", target_config(), target_embeddings=embed,
                         target_lm_head=head)
    for name, tensor in tensors.items():
        assert torch.equal(model.get_parameter(name), tensor), name
    assert torch.equal(model.embed_tokens.weight, embed)
    assert model.config.head_dim == HEAD_DIM and model.config.markov_head_type == "gated"

    sd = dict(tensors, **{"embed_tokens.weight": embed, "lm_head.weight": head})
    input_ids = torch.randint(0, VOCAB, (1, 10), generator=generator)
    features = torch.randn(1, 10, model.config.feature_size, generator=generator)
    anchor = torch.tensor([7])
    ref_h = reference_backbone(sd, input_ids, features, anchor[:, None], raw["mask_token_id"])
    ids, block_pos = block_inputs(input_ids, anchor, raw["mask_token_id"])
    h, logits, _, _ = model.backbone(ids, block_pos, features[:, :7], torch.arange(7)[None],
                                     torch.tensor([7]), torch.tensor([0]), empty_cache(1),
                                     empty_cache(1))
    torch.testing.assert_close(h, ref_h, rtol=1e-4, atol=1e-4)
    temperature, uniforms = torch.tensor([0.8]), torch.rand(1, BLOCK, generator=generator)
    out = model.markov_sample(logits, h, input_ids[:, 7], temperature, uniforms)
    ref = reference_markov(sd, raw, logits, h, input_ids[:, 7], temperature, uniforms)
    assert torch.equal(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[2], ref[2], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_save_load_round_trip(tmp_path):
    model = drafter("rnn")
    out = save_drafter(model, tmp_path / "draft")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == model.config.raw
    names = set(load_file(out / "model.safetensors"))
    assert names == set(model.state_dict()) - {"embed_tokens.weight", "lm_head.weight"}
    loaded = load_drafter(out, target_config(), model.embed_tokens, model.lm_head.weight)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    args = (torch.randn(2, BLOCK, VOCAB), torch.randn(2, BLOCK, HIDDEN), torch.tensor([4, 5]),
            torch.tensor([1.0, 0.0]), torch.rand(2, BLOCK))
    ids, probs, confidence = model.markov_sample(*args)
    loaded_ids, loaded_probs, loaded_confidence = loaded.markov_sample(*args)
    assert torch.equal(ids, loaded_ids)
    # Same weights, other storage: a kernel may take another SIMD path and round 1 ulp apart.
    torch.testing.assert_close(loaded_probs, probs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loaded_confidence, confidence, rtol=1e-6, atol=1e-6)

    with pytest.raises(DraftError, match="not empty"):
        save_drafter(model, out)
    save_drafter(model, out, include_embeddings=True, overwrite=True)
    again = load_drafter(out, dtype=torch.bfloat16)  # embeddings now come from the file
    assert again.lm_head.weight.dtype == torch.bfloat16
    assert [p.name for p in tmp_path.iterdir()] == ["draft"]  # no temp folders left behind


@torch.no_grad()
def test_sharded_checkpoint_loads(tmp_path):
    raw = deepspec_config(markov_head_type="rnn", attention_bias=False)
    tensors = deepspec_tensors(raw, seed=3)
    tensors["embed_tokens.weight"] = torch.randn(VOCAB, HIDDEN)
    tensors["lm_head.weight"] = torch.randn(VOCAB, HIDDEN)
    folder = tmp_path / "draft"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(folder / file))
    weight_map = {n: f for f, part in shards.items() for n in part}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = load_drafter(folder)
    for name, tensor in tensors.items():
        assert torch.equal(model.get_parameter(name), tensor), name


@pytest.mark.parametrize("target", [
    LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=3,
                num_key_value_heads=1, vocab_size=96),
    Qwen2Config(hidden_size=64, intermediate_size=64, num_hidden_layers=30, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=96),
    MistralConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=8, vocab_size=96),
])
@torch.no_grad()
def test_random_drafter_for_other_targets(target, tmp_path):
    model = make_random_drafter(target, markov_rank=4, seed=1)
    heads = target.num_attention_heads
    expected_head_dim = getattr(target, "head_dim", None) or target.hidden_size // heads
    assert model.config.head_dim == expected_head_dim
    assert target.num_hidden_layers - 1 not in model.config.target_layer_ids
    loaded = load_drafter(save_drafter(model, tmp_path / "d", include_embeddings=True), target)
    cache = [torch.zeros(1, model.config.num_kv_heads, 0, model.config.head_dim)]
    inputs = (torch.tensor([[5] + [model.config.mask_token_id] * 6]), torch.arange(3, 10)[None],
              torch.randn(1, 3, model.config.feature_size), torch.arange(3)[None],
              torch.tensor([3]), torch.tensor([0]), cache, cache)
    h, logits, _, _ = loaded.backbone(*inputs)
    torch.testing.assert_close(h, model.backbone(*inputs)[0])
    assert logits.std() > 0.05  # initialisation leaves the logits informative


def test_default_target_layer_ids():
    assert default_target_layer_ids(36) == [1, 9, 17, 25, 33]  # DeepSpec's Qwen3-4B choice
    assert default_target_layer_ids(30) == [1, 8, 14, 21, 27]
    assert default_target_layer_ids(2) == [0]
    assert default_target_layer_ids(1) == [-1]


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    ({"target_layer_ids": [0, 2, 6]}, r"entry 6 is out of range \{-1\} U \[0, 5\]"),
    ({"target_layer_ids": [-2, 1]}, "entry -2 is out of range"),
    ({"target_layer_ids": [1, 5]}, "entry 5 is the target's last layer"),
    ({"target_layer_ids": [2, 2]}, "strictly increasing"),
    ({"target_layer_ids": []}, "non-empty"),
    ({"markov_head_type": "lstm"}, "markov_head_type 'lstm' is not one of vanilla, gated, rnn"),
    ({"mask_token_id": VOCAB}, "mask_token_id 160 is outside the vocabulary"),
    ({"architectures": ["Qwen3ForCausalLM"]}, "only DeepSpec's"),
    ({"layer_types": ["sliding_attention"] * DRAFT_LAYERS}, "full_attention"),
    ({"markov_rank": 0}, "confidence_head_with_markov needs a Markov head"),
    ({"block_size": "7"}, "block_size must be an integer"),
])
def test_bad_config_is_refused_naming_field_and_file(tmp_path, overrides, message):
    raw = deepspec_config(**overrides)
    folder = write_checkpoint(tmp_path / "draft", raw, {"x": torch.zeros(1)})
    with pytest.raises(DraftError, match=message) as info:
        load_drafter(folder)
    assert str(folder / "config.json") in str(info.value)


@pytest.mark.parametrize("field", ["target_layer_ids", "markov_rank", "num_target_layers"])
def test_missing_required_field(field):
    raw = deepspec_config()
    del raw[field]
    with pytest.raises(DraftError, match=f"missing required field.*{field}"):
        DSparkConfig.from_dict(raw, "cfg.json")
    raw = deepspec_config()
    del raw["markov_head_type"]
    with pytest.raises(DraftError, match="markov_head_type is required"):
        DSparkConfig.from_dict(raw, "cfg.json")


@pytest.mark.parametrize("overrides,message", [
    ({"hidden_size": 32, "head_dim": 8}, "hidden_size is 64 but the target's hidden_size is 32"),
    ({"vocab_size": 200}, "vocab_size is 160 but the target's vocab_size is 200"),
    ({"num_hidden_layers": 8}, "num_target_layers is 6 but the target's num_hidden_layers is 8"),
])
def test_target_mismatch_is_refused(tmp_path, overrides, message):
    folder = save_drafter(drafter(), tmp_path / "draft")
    with pytest.raises(DraftError, match=message):
        load_drafter(folder, target_config(**overrides))


def test_bad_tensors_are_refused(tmp_path):
    raw = deepspec_config()
    tensors = deepspec_tensors(raw)
    embed = torch.zeros(VOCAB, HIDDEN)

    bad = dict(tensors, **{"fc.weight": torch.zeros(HIDDEN, 2 * HIDDEN)})
    folder = write_checkpoint(tmp_path / "fc", raw, bad)
    with pytest.raises(DraftError, match=r"fc.weight has shape \[64, 128\].*\[64, 192\]"
                       r".*len\(target_layer_ids\) \* hidden_size") as info:
        load_drafter(folder, target_embeddings=embed, target_lm_head=embed)
    assert str(folder / "model.safetensors") in str(info.value)

    folder = write_checkpoint(tmp_path / "noembed", raw, tensors)
    with pytest.raises(DraftError, match="embed_tokens.weight is not in the checkpoint"):
        load_drafter(folder)
    with pytest.raises(DraftError, match=r"lm_head.weight has shape \[100, 64\].*\[160, 64\]"):
        load_drafter(folder, target_embeddings=embed, target_lm_head=torch.zeros(100, HIDDEN))

    missing = {k: v for k, v in tensors.items() if k != "markov_head.gate_proj.bias"}
    with pytest.raises(DraftError, match="lacks tensor.*markov_head.gate_proj.bias"):
        load_drafter(write_checkpoint(tmp_path / "missing", raw, missing), target_embeddings=embed,
                     target_lm_head=embed)
    extra = dict(tensors, **{"markov_head.joint_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(DraftError, match="unexpected tensor.*joint_proj"):
        load_drafter(write_checkpoint(tmp_path / "extra", raw, extra), target_embeddings=embed,
                     target_lm_head=embed)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(DraftError, match="drafter folder not found"):
        load_drafter(tmp_path / "nowhere")
    folder = tmp_path / "draft"
    folder.mkdir()
    with pytest.raises(DraftError, match=f"{folder / 'config.json'}: drafter config not found"):
        load_drafter(folder)
    (folder / "config.json").write_text(json.dumps(deepspec_config()))
    with pytest.raises(DraftError, match="no model.safetensors or model.safetensors.index.json"):
        load_drafter(folder)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"fc.weight": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(DraftError, match="model-00001-of-00001.safetensors: shard named"):
        load_drafter(folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DraftError, match="cannot read safetensors"):
        load_drafter(folder)

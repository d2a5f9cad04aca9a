"""TargetAdapter equals the Hugging Face forward, with caches, padding and feature taps."""
from __future__ import annotations

import json

import pytest
import torch

from dspark_export.models.target import TargetAdapter, TargetError, load_target, read_target_config

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]


def hf_reference(model, ids: torch.Tensor):
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    return out.logits.float(), out.hidden_states


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_decode_matches_hf(tiny_targets, family):
    model, _ = load_target(tiny_targets[family])
    layer_ids = [-1, 0, 2]
    adapter = TargetAdapter(model, layer_ids)
    torch.manual_seed(1)
    ids = torch.randint(3, 200, (1, 12))
    ref_logits, ref_hidden = hf_reference(model, ids)
    ref_features = torch.cat([ref_hidden[i + 1] for i in layer_ids], dim=-1)

    with torch.no_grad():
        keys, values = adapter.empty_cache(1, 0)
        logits, feats, pk, pv = adapter(
            ids[:, :9], torch.arange(9)[None], torch.tensor([0]), torch.tensor([9]), keys, values
        )
        torch.testing.assert_close(logits, ref_logits[:, :9], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(feats, ref_features[:, :9], atol=1e-4, rtol=1e-4)
        # A cache buffer longer than the valid past: the tail must be ignored.
        buf_k = [torch.cat([k, torch.randn(1, k.shape[1], 5, k.shape[3])], 2) for k in pk]
        buf_v = [torch.cat([v, torch.randn(1, v.shape[1], 5, v.shape[3])], 2) for v in pv]
        logits2, feats2, _, _ = adapter(
            ids[:, 9:], torch.arange(9, 12)[None], torch.tensor([9]), torch.tensor([3]), buf_k, buf_v
        )
    torch.testing.assert_close(logits2, ref_logits[:, 9:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats2, ref_features[:, 9:], atol=1e-4, rtol=1e-4)


def test_batch_rows_with_different_lengths(tiny_targets):
    model, _ = load_target(tiny_targets["qwen3"])
    adapter = TargetAdapter(model, [1])
    torch.manual_seed(2)
    a, b = torch.randint(3, 200, (1, 7)), torch.randint(3, 200, (1, 4))
    with torch.no_grad():
        ka, va = adapter.empty_cache(1, 0)
        la, _, pka, pva = adapter(a[:, :5], torch.arange(5)[None], torch.tensor([0]), torch.tensor([5]), ka, va)
        kb, vb = adapter.empty_cache(1, 0)
        lb, _, pkb, pvb = adapter(b[:, :2], torch.arange(2)[None], torch.tensor([0]), torch.tensor([2]), kb, vb)
        # Batch: row 0 has past 5 and 2 new tokens, row 1 has past 2 and 1 new token (padded).
        pad = lambda t, n: torch.cat([t, torch.zeros(*t.shape[:2], n, t.shape[3])], 2)
        keys = [torch.cat([x, pad(y, 3)]) for x, y in zip(pka, pkb)]
        values = [torch.cat([x, pad(y, 3)]) for x, y in zip(pva, pvb)]
        ids = torch.tensor([[a[0, 5].item(), a[0, 6].item()], [b[0, 2].item(), 0]])
        pos = torch.tensor([[5, 6], [2, 3]])
        logits, _, _, _ = adapter(ids, pos, torch.tensor([5, 2]), torch.tensor([2, 1]), keys, values)
        ref_a, _ = hf_reference(model, a)
        ref_b, _ = hf_reference(model, b[:, :3])
    torch.testing.assert_close(logits[0], ref_a[0, 5:7], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1, 0], ref_b[0, 2], atol=1e-4, rtol=1e-4)


def test_bad_layer_ids_and_architectures(tiny_targets, tmp_path):
    model, _ = load_target(tiny_targets["llama"])
    with pytest.raises(TargetError, match="last layer"):
        TargetAdapter(model, [0, 3])
    with pytest.raises(TargetError, match="out of range"):
        TargetAdapter(model, [0, 7])
    with pytest.raises(TargetError, match="strictly increasing"):
        TargetAdapter(model, [2, 1])
    config = json.loads((tiny_targets["llama"] / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TargetError, match="supported: llama, mistral, qwen2, qwen3"):
        read_target_config(tmp_path)
    with pytest.raises(TargetError, match="no config.json"):
        read_target_config(tmp_path / "missing")

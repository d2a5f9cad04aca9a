"""Frequency-ranked draft vocabulary: choosing it, and a drafter restricted to it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dspark_export.models.draft import DraftError, make_random_drafter
from dspark_export.models.draft_vocab import (
    TOKEN_COUNTS_NAME,
    DraftVocabError,
    coverage,
    read_token_counts,
    select_draft_vocab,
    write_token_counts,
)
from dspark_export.models.target import load_target


def test_counts_round_trip_and_selection(tmp_path):
    tokens = np.array([5, 5, 5, 7, 7, 9, 1, 1, 1, 1])
    write_token_counts(tmp_path, tokens, vocab_size=12, source="test")
    counts = read_token_counts(tmp_path, 12)
    assert counts.tolist() == [0, 4, 0, 0, 0, 3, 0, 2, 0, 1, 0, 0]
    assert select_draft_vocab(counts, 2).tolist() == [1, 5]
    # stop tokens are always held; ties go to the lower id
    assert select_draft_vocab(counts, 3, always=[11]).tolist() == [1, 5, 11]
    assert select_draft_vocab(counts, 6).tolist() == [0, 1, 2, 5, 7, 9]
    assert coverage(counts, np.array([1, 5])) == pytest.approx(0.7)


def test_bad_counts_and_sizes_are_refused(tmp_path):
    with pytest.raises(DraftVocabError, match=TOKEN_COUNTS_NAME):
        read_token_counts(tmp_path, 12)
    write_token_counts(tmp_path, np.array([1, 2]), vocab_size=12, source="test")
    with pytest.raises(DraftVocabError, match="vocab_size"):
        read_token_counts(tmp_path, 13)
    record = json.loads((tmp_path / TOKEN_COUNTS_NAME).read_text())
    (tmp_path / TOKEN_COUNTS_NAME).write_text(json.dumps({**record, "format": "other/9"}))
    with pytest.raises(DraftVocabError, match="format"):
        read_token_counts(tmp_path, 12)
    counts = np.ones(12, dtype=np.int64)
    with pytest.raises(DraftVocabError, match="not in 1..12"):
        select_draft_vocab(counts, 0)
    with pytest.raises(DraftVocabError, match="smaller than"):
        select_draft_vocab(counts, 1, always=[3, 4])


@pytest.mark.parametrize("head_type,rank", [("vanilla", 8), ("gated", 8), ("rnn", 8), ("vanilla", 0)])
def test_restricted_drafter_drafts_the_argmax_over_its_vocabulary(tiny_targets, head_type, rank):
    model, _ = load_target(tiny_targets["llama"])
    full = make_random_drafter(model.config, block_size=4, target_layer_ids=[0, 2],
                               markov_rank=rank, markov_head_type=head_type, seed=4)
    c = full.config
    restricted = make_random_drafter(model.config, block_size=4, target_layer_ids=[0, 2],
                                     markov_rank=rank, markov_head_type=head_type, seed=4)
    vocab = torch.arange(3, c.vocab_size, 3)
    restricted.restrict_vocab(vocab)
    g = torch.Generator().manual_seed(0)
    batch, ctx = 2, 5
    block = torch.full((batch, 4), c.mask_token_id)
    block[:, 0] = torch.tensor([7, 11])
    empty = [torch.zeros(batch, c.num_kv_heads, 0, c.head_dim)]
    args = (block, ctx + torch.arange(4)[None].repeat(batch, 1),
            torch.randn(batch, ctx, c.feature_size, generator=g),
            torch.arange(ctx)[None].repeat(batch, 1), torch.tensor([ctx, ctx]),
            torch.zeros(batch, dtype=torch.long), empty, empty)
    with torch.no_grad():
        hidden, logits, _, _ = full.backbone(*args)
        r_hidden, r_logits, _, _ = restricted.backbone(*args)
        torch.testing.assert_close(r_hidden, hidden)
        torch.testing.assert_close(r_logits, logits[..., vocab])
        greedy = torch.zeros(batch)
        ids, probs, conf = restricted.markov_sample(r_logits, r_hidden, block[:, 0], greedy,
                                                    torch.rand(batch, 4, generator=g))
    assert probs.shape[-1] == c.vocab_size and torch.isin(ids, vocab).all()
    # the greedy pick is the argmax over the vocabulary of the full drafter's logits
    prev = block[:, 0]
    state = torch.zeros(batch, rank) if rank else None
    for k in range(4):
        step = logits[:, k]
        if rank:
            emb = full.markov_head.prev_embeddings(prev)
            e, state = full.markov_head.transition_input(emb, hidden[:, k], state)
            bias = full.markov_head.markov_w2(e)
            step = step + bias
        want = vocab[step[:, vocab].argmax(-1)]
        assert ids[:, k].tolist() == want.tolist()
        assert torch.equal(probs[:, k], torch.nn.functional.one_hot(want, c.vocab_size).float())
        prev = want
    sampled, sprobs, _ = restricted.markov_sample(r_logits, r_hidden, block[:, 0],
                                                  torch.ones(batch), torch.rand(batch, 4))
    outside = torch.ones(c.vocab_size, dtype=torch.bool)
    outside[vocab] = False
    assert torch.isin(sampled, vocab).all() and sprobs[..., outside].abs().max() == 0.0
    torch.testing.assert_close(sprobs.sum(-1), torch.ones(batch, 4))


def test_restrict_vocab_refuses_bad_ids(tiny_targets):
    model, _ = load_target(tiny_targets["llama"])
    drafter = make_random_drafter(model.config, block_size=4, target_layer_ids=[0, 2], seed=0)
    with pytest.raises(DraftError, match="0..255"):
        drafter.restrict_vocab([1, 256])
    assert "draft_vocab" not in drafter.state_dict()  # never saved: DeepSpec's format stays

"""Continuous-batching greedy decoding (data generation for distill) == transformers greedy."""
from __future__ import annotations

import pytest
import torch

from dspark_export.greedy_batch import greedy_answers


@pytest.mark.parametrize("slots", [3, 16])
def test_greedy_answers_equal_generate(tiny_targets, slots):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_targets["qwen3"], dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 30, (11,), generator=g)]
    first = torch.tensor([prompts[0]])
    free = model.generate(first, attention_mask=torch.ones_like(first), max_new_tokens=12,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    stop = int(free[0, len(prompts[0]) + 4])  # so that some answers stop early
    got = dict(greedy_answers(model, enumerate(prompts), max_new_tokens=12, max_prompt_tokens=30,
                              stop_ids=[stop], slots=slots))
    assert sorted(got) == list(range(len(prompts)))
    stopped = 0
    for key, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                             do_sample=False, eos_token_id=[stop], pad_token_id=0)
        want = out[0, len(prompt):].tolist()
        want = want[:want.index(stop) + 1] if stop in want else want
        assert got[key] == want, key
        stopped += want[-1] == stop
    assert 0 < stopped < len(prompts)  # both ways of ending were exercised


def test_greedy_answers_refuse_long_prompts(tiny_targets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_targets["llama"], dtype=torch.float32).eval()
    with pytest.raises(ValueError, match="prompt 0 has 9 tokens"):
        list(greedy_answers(model, [(0, list(range(3, 12)))], max_new_tokens=4,
                            max_prompt_tokens=8, stop_ids=[2]))

"""Greedy answers for many prompts at once: continuous batching over preallocated caches.

`transformers.generate` grows its cache by concatenation every step and keeps finished rows
until the longest answer ends; on a CPU that makes data generation for `distill` several times
slower than the model's own cost. Here a fixed set of slots decodes through the target adapter
(models/target.py: explicit `[B, Hk, S, D]` caches with per-row lengths, the same code the
exporter traces); a slot whose answer ends takes the next prompt, prefilled in small groups,
and once the prompts run out the idle slots are dropped as they accumulate.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from dspark_export.models.target import TargetAdapter

PREFILL_GROUP = 8  # prompts prefilled together ([group, length, V] fp32 logits)


@torch.no_grad()
def greedy_answers(
    model,
    prompts: Iterable[tuple[int, Sequence[int]]],
    *,
    max_new_tokens: int,
    max_prompt_tokens: int,
    stop_ids: Sequence[int],
    slots: int = 64,
) -> Iterator[tuple[int, list[int]]]:
    """Yield (key, answer ids) for each (key, prompt ids), in completion order.

    An answer ends with (and keeps) its first stop token, or after `max_new_tokens`. Prompts
    must be at most `max_prompt_tokens` long.
    """
    # The adapter needs a feature tap; layer 0's output is computed anyway and ignored.
    adapter = TargetAdapter(model, [0])
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    capacity = max_prompt_tokens + max_new_tokens
    keys, values = adapter.empty_cache(slots, capacity, dtype)
    keys, values = [k.to(device) for k in keys], [v.to(device) for v in values]
    lengths = torch.zeros(slots, dtype=torch.long, device=device)
    tokens = torch.zeros(slots, dtype=torch.long, device=device)
    owner: list[int | None] = [None] * slots
    answers: list[list[int]] = [[] for _ in range(slots)]
    stops = set(int(t) for t in stop_ids)
    pending = iter(prompts)
    exhausted = False

    def refill(free: list[int]) -> None:
        nonlocal exhausted
        batch: list[tuple[int, int, Sequence[int]]] = []
        for slot in free:
            item = next(pending, None)
            if item is None:
                exhausted = True
                break
            key, ids = item
            if len(ids) > max_prompt_tokens:
                raise ValueError(f"prompt {key} has {len(ids)} tokens > {max_prompt_tokens}")
            batch.append((slot, key, ids))
        for lo in range(0, len(batch), PREFILL_GROUP):
            _prefill(adapter, batch[lo:lo + PREFILL_GROUP], keys, values, lengths, tokens, dtype)
        for slot, key, _ in batch:
            owner[slot], answers[slot] = key, [int(tokens[slot])]

    refill(list(range(slots)))
    while any(o is not None for o in owner):
        # Finish slots whose answer just ended (a stop token or the budget).
        for slot in range(slots):
            answer = answers[slot]
            if owner[slot] is not None and (answer[-1] in stops or len(answer) >= max_new_tokens):
                yield owner[slot], answer
                owner[slot] = None
                lengths[slot] = 0  # an idle slot computes on at position 0, ignored
        free = [s for s in range(slots) if owner[s] is None]
        if free and not exhausted and (len(free) >= PREFILL_GROUP or len(free) == slots):
            refill(free)
        live = [s for s in range(slots) if owner[s] is not None]
        if not live:
            continue
        if exhausted and len(live) <= slots // 2:  # the wave's tail: drop the idle slots
            keep = torch.tensor(live, device=device)
            keys, values = [k[keep] for k in keys], [v[keep] for v in values]
            lengths, tokens = lengths[keep], tokens[keep]
            owner, answers = [owner[s] for s in live], [answers[s] for s in live]
            slots = len(live)
        # Every slot steps (idle ones too): the caches stay views of their used prefix.
        width = int(lengths.max())
        everyone = torch.arange(slots, device=device)
        logits, _, new_k, new_v = adapter(
            tokens[:, None], lengths[:, None], lengths, torch.ones_like(lengths),
            [k[:, :, :width] for k in keys], [v[:, :, :width] for v in values])
        for i in range(len(keys)):
            keys[i][everyone, :, lengths] = new_k[i][:, :, 0]
            values[i][everyone, :, lengths] = new_v[i][:, :, 0]
        lengths += 1
        tokens = logits[:, 0].argmax(-1)
        for slot, token in enumerate(tokens.tolist()):
            if owner[slot] is not None:
                answers[slot].append(token)


def _prefill(adapter: TargetAdapter, batch, keys, values, lengths, tokens, dtype) -> None:
    """Run prompts into their slots' caches; set each slot's first answer token."""
    device = lengths.device
    slots = [slot for slot, _, _ in batch]
    sizes = torch.tensor([len(ids) for _, _, ids in batch], device=device)
    width = int(sizes.max())
    ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
    for row, (_, _, prompt) in enumerate(batch):
        ids[row, :len(prompt)] = torch.tensor(list(prompt), device=device)
    positions = torch.arange(width, device=device)[None].expand(len(batch), -1)
    empty_k, empty_v = adapter.empty_cache(len(batch), 0, dtype)
    logits, _, new_k, new_v = adapter(
        ids, positions, torch.zeros_like(sizes), sizes,
        [k.to(device) for k in empty_k], [v.to(device) for v in empty_v])
    index = torch.tensor(slots, device=device)
    for i in range(len(keys)):
        keys[i][index, :, :width] = new_k[i]
        values[i][index, :, :width] = new_v[i]
    lengths[index] = sizes
    tokens[index] = logits[torch.arange(len(batch), device=device), sizes - 1].argmax(-1)

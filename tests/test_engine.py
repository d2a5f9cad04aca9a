"""The continuous-batching engine: requests join, leave and reuse slots between steps, and each
request's tokens stay what it gets alone (tiny exported pair, ONNX Runtime CPU)."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import export_tiny_pair

from dspark_runtime.engine import Engine, Request
from dspark_runtime.schedule import make_scheduler

PROMPTS = ["t5 t6 t7 t8 t9", "t20", "t30 t31 t32 t33 t34 t35 t36 t37 t38 t39 t40", "t50 t51",
           "t60 t61 t62 t63"]
MAX_NEW = 20


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from dspark_runtime.pipeline import Pipeline

    export: Path = export_tiny_pair(tmp_path_factory.getbasetemp())
    return Pipeline.from_bundle(export, schedule="fixed")


@pytest.fixture(scope="module")
def solo(pipe):
    """Each prompt alone, greedy and sampled (seed = prompt index): what every engine run of
    the same requests must give, however they are batched."""
    ids = pipe.encode(PROMPTS)
    return {(i, t): pipe.generate([p], max_new_tokens=MAX_NEW, temperature=t, seed=i).requests[0]
            for i, p in enumerate(ids) for t in (0.0, 1.0)}


def _engine(pipe, slots: int, *, gamma: int | None = None, **kwargs) -> Engine:
    gamma = pipe.gamma if gamma is None else gamma
    scheduler = make_scheduler("fixed", gamma=gamma) if gamma else None
    return Engine(pipe, slots=slots, capacity=64, gamma=gamma, scheduler=scheduler, **kwargs)


def _run(engine: Engine, arrivals: dict[int, list[int]], requests: list[Request]) -> dict:
    """Submit requests[i] for i in arrivals[step] before that step; run until idle."""
    ids, step = {}, 0
    while engine.has_work() or any(k >= step for k in arrivals):
        for i in arrivals.get(step, []):
            ids[engine.submit(requests[i])] = i
        engine.step()
        step += 1
    return {ids[rid]: out for rid, out in engine.finished.items()}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_requests_joining_mid_flight_get_their_solo_tokens(pipe, solo, temperature):
    ids = pipe.encode(PROMPTS)
    requests = [Request(p, MAX_NEW, temperature, i) for i, p in enumerate(ids)]
    engine = _engine(pipe, slots=3, prefill_chunk=4)  # prompt 2 prefills over 3 steps
    outs = _run(engine, {0: [0, 1], 2: [2], 3: [3, 4]}, requests)
    assert sorted(outs) == list(range(len(PROMPTS)))
    for i, out in outs.items():
        want = solo[(i, temperature)]
        assert out.token_ids == want.token_ids, i
        assert out.accepted == want.accepted and out.verified == want.verified, i
    assert engine.running == 0 and not engine.decoding.any()


def test_target_only_engine_and_chunked_prefill(pipe):
    ids = pipe.encode(PROMPTS)
    want = pipe.generate(PROMPTS, max_new_tokens=MAX_NEW, target_only=True).requests
    engine = _engine(pipe, slots=2, gamma=0, prefill_chunk=4)
    outs = _run(engine, {0: list(range(len(ids)))},
                [Request(p, MAX_NEW) for p in ids])
    assert [outs[i].token_ids for i in range(len(ids))] == [w.token_ids for w in want]
    chunked = _run(_engine(pipe, slots=1, prefill_chunk=3), {0: [0]}, [Request(ids[2], MAX_NEW)])
    assert chunked[0].token_ids == want[2].token_ids  # 12 prompt tokens in 4 chunks


def test_cancel_frees_the_slot_for_a_waiting_request(pipe, solo):
    ids = pipe.encode(PROMPTS)
    engine = _engine(pipe, slots=1)
    first = engine.submit(Request(ids[0], MAX_NEW))
    second = engine.submit(Request(ids[1], MAX_NEW, seed=1))
    engine.step()
    assert engine.running == 1 and len(engine.waiting) == 1
    engine.cancel(first)
    assert engine.finished[first].finish_reason == "cancelled" and engine.running == 0
    while engine.has_work():
        engine.step()
    assert engine.finished[second].token_ids == solo[(1, 0.0)].token_ids


def test_streamed_text_and_bad_requests(pipe, solo):
    ids = pipe.encode(PROMPTS)
    pieces: dict[int, str] = {}
    engine = _engine(pipe, slots=2,
                     on_text=lambda rid, text: pieces.__setitem__(rid, pieces.get(rid, "") + text))
    rids = [engine.submit(Request(p, MAX_NEW)) for p in ids[:3]]
    while engine.has_work():
        engine.step()
    for i, rid in enumerate(rids):
        assert pieces[rid] == engine.finished[rid].text == solo[(i, 0.0)].text
    with pytest.raises(ValueError, match="empty prompt"):
        engine.submit(Request([], MAX_NEW))
    with pytest.raises(ValueError, match="leaves no room"):
        engine.submit(Request([5] * 64, MAX_NEW))
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.submit(Request(ids[0], 0))
    with pytest.raises(ValueError, match="needs a scheduler"):
        Engine(pipe, slots=1, capacity=8, gamma=pipe.gamma)


SHARED = " ".join(f"t{i}" for i in range(100, 120))  # a 20-token prefix, like a system turn
PREFIXED = [SHARED + " t40 t41", SHARED + " t50", SHARED + " t40 t41"]


@pytest.mark.parametrize("gamma", [None, 0])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_shared_prompt_prefix_is_copied_not_prefilled(pipe, gamma, temperature):
    """A newcomer copies the prefix a running request holds (0 -> 1), or the whole prompt but
    its last token from what a finished one left (0 -> 2); its tokens stay its solo tokens."""
    ids = pipe.encode(PREFIXED)
    target_only = gamma == 0
    want = [pipe.generate([p], max_new_tokens=MAX_NEW, temperature=temperature, seed=i,
                          target_only=target_only).requests[0] for i, p in enumerate(ids)]
    requests = [Request(p, MAX_NEW, temperature, i) for i, p in enumerate(ids)]
    shared = next(k for k, (a, b) in enumerate(zip(ids[0], ids[1])) if a != b)
    assert shared >= 20

    engine = _engine(pipe, slots=2, gamma=gamma)
    outs = _run(engine, {0: [0, 1], 30: [2]}, requests)  # 2 arrives after 0 and 1 finished
    for i, out in outs.items():
        assert out.token_ids == want[i].token_ids, i
        assert out.accepted == want[i].accepted and out.verified == want[i].verified, i
    assert [outs[i].cached_tokens for i in range(3)] == [0, shared, len(ids[2]) - 1]

    plain = _run(_engine(pipe, slots=2, gamma=gamma, reuse_prefixes=False), {0: [0, 1], 30: [2]},
                 requests)
    assert [plain[i].cached_tokens for i in range(3)] == [0, 0, 0]
    assert [plain[i].token_ids for i in range(3)] == [outs[i].token_ids for i in range(3)]

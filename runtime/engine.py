"""Continuous batching: requests join and leave the running batch between steps.

The engine owns `slots` rows of KV cache (target and draft) and the request in each slot. Each
`step()`:
1. admits waiting requests into free slots, the lowest first, so the window a round runs over
   (first to last busy slot) stays compact;
2. prefills newcomers in chunks of at most `prefill_chunk` tokens, up to `prefill_budget`
   tokens a step, so a long prompt delays the others' rounds by one chunk at a time. When
   drafting, each chunk's context features go into the draft cache at once (a draft run whose
   block is discarded); a request whose prompt is in samples its first token. Before its
   first chunk, a newcomer copies the longest prefix of its prompt that another slot's caches
   hold (a running request's, or what a finished one left; chat prompts share their template's
   system turn) and prefills only the rest;
3. runs one round for the decoding slots: `_speculative_round` (draft -> markov -> schedule ->
   target verify -> SpecVerify -> commit) or `_target_round` (one token a row): target-only
   engines always, speculative ones when the `DraftGate` predicts that drafting will not pay
   (draft_gate.py: with the hardware-aware schedulers, under load);
4. emits tokens, retires finished or cancelled requests and frees their slots.

The accepted tokens' context features of a slot wait in a per-slot buffer (`PendingContext`)
until its next draft, so consecutive rounds may run over different windows or skip drafting.
The scheduler sees every slot (idle ones inactive), so its state keeps one shape.
Randomness is per request (sampling.py): a request's tokens do not depend on its neighbours.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .calibration import sigmoid
from .draft_gate import DraftGate, pending_context_width
from .kv import KVCache, prefix_indices
from .sampling import RequestRandomness, select_tokens
from .stats import RequestOutput, StageTimer

if TYPE_CHECKING:
    from .pipeline import Pipeline

DEFAULT_PREFILL_CHUNK = 512
# Shorter shared prefixes are prefilled anyway: a copy saves little below this many tokens.
MIN_PREFIX_REUSE = 8
TextCallback = Callable[[int, str], None]  # (request id, new text)


@dataclass
class Request:
    """One generation request: prompt token ids and its own sampling settings."""

    prompt_ids: list[int]
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0


@dataclass
class RoundRecord:
    """What one speculative round decided for the requests that took part in it."""

    request_ids: list[int]
    confidence_logits: np.ndarray  # [rows, G], raw (before calibration); [rows, 0] undrafted
    verify_lengths: np.ndarray  # [rows]
    accepted: np.ndarray  # [rows]
    drafted: bool = True  # False: the draft gate skipped drafting, one target token a row


@dataclass
class _Slot:
    request_id: int
    request: Request
    output: RequestOutput
    decoder: Any
    prefilled: int = 0  # prompt tokens already in the caches


class PendingContext:
    """Per slot, the context features (and positions) of the tokens accepted since its last
    draft run, which the next draft run takes into the draft cache: up to `width` tokens."""

    def __init__(self, memory: Any, slots: int, width: int, features: int, dtype: Any) -> None:
        self.memory, self.width, self.dim = memory, width, features
        # [slots, 1, width, F]: the layout Memory.commit appends along (axis 2)
        self.features = memory.empty((slots, 1, width, features), dtype)
        self.positions = np.zeros((slots, width), dtype=np.int64)
        self.counts = np.zeros(slots, dtype=np.int64)

    def append(self, features: Any, positions: np.ndarray, counts: np.ndarray, lo: int) -> None:
        """The first counts[b] tokens of rows lo:lo+len(counts) of the last target run
        (features [rows, T, F], positions [rows, T])."""
        rows, steps = len(counts), positions.shape[1]
        hi = lo + rows
        if np.any(self.counts[lo:hi] + counts > self.width):
            raise ValueError(f"pending context overflow: width {self.width}, "
                             f"{self.counts[lo:hi]} + {counts}")
        source = self.memory.reshape(features, (rows, 1, steps, self.dim))
        self.memory.commit([self.memory.rows(self.features, lo, hi)], [source],
                           self.counts[lo:hi], counts)
        self.memory.synchronize()
        row, step = prefix_indices(counts)
        self.positions[lo + row, self.counts[lo + row] + step] = positions[row, step]
        self.counts[lo:hi] += counts

    def take(self, lo: int, hi: int, active: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
        """Features [rows, n, F], positions [rows, n] and counts of rows lo:hi for a draft run
        (n: the most any active row holds, at least 1), then empty them."""
        counts = np.where(active, self.counts[lo:hi], 0)
        n = max(1, int(counts.max()))
        rows = self.memory.reshape(self.memory.rows(self.features, lo, hi),
                                   (hi - lo, self.width, self.dim))
        features = self.memory.leading(rows, n)
        positions = self.positions[lo:hi, :n].copy()
        self.counts[lo:hi] = 0
        return features, positions, counts

    def full(self, lo: int, hi: int) -> bool:
        """No room for another skipped round's token in some row."""
        return bool(self.counts[lo:hi].max() >= self.width)


class Engine:
    """Requests in, tokens out, one `step()` at a time (see the module doc)."""

    def __init__(self, pipe: Pipeline, *, slots: int, capacity: int, gamma: int,
                 scheduler: Any = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 prefill_budget: int | None = None, on_text: TextCallback | None = None,
                 on_round: Callable[[RoundRecord], None] | None = None,
                 on_finish: Callable[[int, RequestOutput], None] | None = None,
                 reuse_prefixes: bool = True, gate_from: DraftGate | None = None) -> None:
        """`capacity`: cache positions per slot (prompt + generated + one round's drafts);
        `gamma` 0 decodes target-only; `scheduler` picks verify lengths when drafting; with a
        hardware-aware one (it costs verification by an SPS table) the engine skips drafting
        in rounds where it would not pay (draft_gate.py).
        A finished request goes to `on_finish` if given, else stays in `finished`.
        `reuse_prefixes`: a newcomer copies a prompt prefix another slot holds (module doc).
        `gate_from`: an earlier engine's draft gate whose evidence this one's starts from."""
        if gamma and scheduler is None:
            raise ValueError("a speculative engine (gamma > 0) needs a scheduler")
        self.pipe, self.gamma, self.scheduler = pipe, gamma, scheduler
        self.capacity, self.prefill_chunk = capacity, prefill_chunk
        self.prefill_budget = prefill_budget or prefill_chunk
        self.on_text, self.on_round, self.on_finish = on_text, on_round, on_finish
        self.kv = KVCache.for_graph(pipe.target, batch=slots, capacity=capacity)
        if gamma:
            self.draft_kv = KVCache.for_graph(pipe.draft, batch=slots, capacity=capacity)
            _, _, features = pipe.draft.input_shapes["context_features"]
            self.context = PendingContext(pipe.memory, slots, pending_context_width(gamma),
                                          int(features),
                                          pipe.draft.input_dtypes["context_features"])
            self.block_ids = np.full((slots, gamma), pipe.mask_token_id, dtype=np.int64)
        sps = getattr(scheduler, "sps", None)  # the hardware-aware schedulers' cost table
        self.gate = DraftGate(sps, slots, gamma) if gamma and sps is not None else None
        if self.gate is not None and gate_from is not None:
            self.gate.adopt(gate_from)
        self.slots: list[_Slot | None] = [None] * slots
        self.reuse_prefixes = reuse_prefixes
        # per slot: the token ids a finished request left in its caches, and how many of them
        # both caches hold (from position 0)
        self.residue: list[tuple[list[int], int]] = [([], 0)] * slots
        self.waiting: deque[tuple[int, Request]] = deque()
        self.finished: dict[int, RequestOutput] = {}
        self.decoding = np.zeros(slots, dtype=bool)
        self.anchors = np.zeros(slots, dtype=np.int64)
        self.temperature = np.zeros(slots, dtype=np.float32)
        self.rng = RequestRandomness([0] * slots)
        self.offsets = np.arange(max(gamma, 1) + 1, dtype=np.int64)
        self.timer = StageTimer()
        self.steps = 0
        self._next_id = 0

    # --- requests --------------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """ValueError for a request this engine cannot take (pure: callable from any thread)."""
        if not request.prompt_ids:
            raise ValueError("empty prompt")
        if len(request.prompt_ids) + 1 > self.capacity:
            raise ValueError(f"a prompt of {len(request.prompt_ids)} tokens leaves no room to "
                             f"generate in {self.capacity} cache positions")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")

    def submit(self, request: Request, request_id: int | None = None) -> int:
        """Queue a request (under `request_id`, or the next free id); its id."""
        self.check(request)
        if request_id is None:
            request_id, self._next_id = self._next_id, self._next_id + 1
        self.waiting.append((request_id, request))
        return request_id

    def cancel(self, request_id: int) -> None:
        """End a request, waiting or running (a running one frees its slot at once); it
        finishes with reason "cancelled" and the tokens it has."""
        for waiting in [w for w in self.waiting if w[0] == request_id]:
            self.waiting.remove(waiting)
            self._finish(request_id, RequestOutput("", [], len(waiting[1].prompt_ids),
                                                   "cancelled"))
        for s, slot in enumerate(self.slots):
            if slot is not None and slot.request_id == request_id:
                slot.output.finish_reason = "cancelled"
                self._retire(s)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(slot is not None for slot in self.slots)

    @property
    def running(self) -> int:
        return sum(slot is not None for slot in self.slots)

    # --- one step --------------------------------------------------------------------------

    def step(self) -> None:
        """Admit, prefill up to the budget, then one round for the decoding slots."""
        self._admit()
        self._prefill()
        if self.decoding.any():
            if self._drafts():
                self._speculative_round()
            else:
                self._target_round()
            self.steps += 1

    def _drafts(self) -> bool:
        """Whether this round drafts: always when speculative, unless the gate says no; then
        a row whose waiting context is full has it taken into the draft cache first."""
        if not self.gamma:
            return False
        if self.gate is None:
            return True
        lo, hi, active = self._window()
        full = self.context.full(lo, hi)
        if self.gate.should_draft(lo, active, context_full=full):
            return True
        if full:
            self._draft_run(lo, hi, active)
        return False

    def _admit(self) -> None:
        for s, slot in enumerate(self.slots):
            if not self.waiting:
                return
            if slot is None:
                request_id, request = self.waiting.popleft()
                self.slots[s] = _Slot(request_id, request,
                                      RequestOutput("", [], len(request.prompt_ids)),
                                      self.pipe.tokenizer.stream())
                self.kv.lengths[s] = 0
                if self.gamma:
                    self.draft_kv.lengths[s] = 0
                    self.context.counts[s] = 0
                    if self.gate is not None:
                        self.gate.forget(s)
                self.temperature[s] = request.temperature
                self.rng.reseed(s, request.seed)

    def _prefill(self) -> None:
        budget = self.prefill_budget
        for s, slot in enumerate(self.slots):
            if slot is not None and slot.prefilled == 0 and self.reuse_prefixes:
                self._reuse_prefix(s, slot)
            while slot is not None and slot.prefilled < len(slot.request.prompt_ids) \
                    and budget > 0:
                budget -= self._prefill_chunk(s, slot, min(self.prefill_chunk, budget))

    def _caches(self) -> tuple[KVCache, ...]:
        return (self.kv, self.draft_kv) if self.gamma else (self.kv,)

    def _held(self, d: int, newcomer: int) -> tuple[Sequence[int], int]:
        """Token ids whose K/V slot d's caches hold from position 0, and how many (both caches:
        the draft cache may lag by the context waiting for the next draft)."""
        slot = self.slots[d]
        if slot is None or d == newcomer:
            ids, n = self.residue[d]
        else:
            ids = slot.request.prompt_ids + slot.output.token_ids
            n = min(int(cache.lengths[d]) for cache in self._caches())
        return ids, min([n] + [cache.allocated for cache in self._caches()])

    def _reuse_prefix(self, s: int, slot: _Slot) -> None:
        """Copy into slot s the longest prefix of its prompt (all but the last token, which
        must run to give the first new token) that some slot's caches hold."""
        prompt = np.asarray(slot.request.prompt_ids)
        best, donor = 0, s
        for d in range(len(self.slots)):
            ids, n = self._held(d, s)
            n = min(n, len(prompt) - 1)
            if n <= best:
                continue
            same = np.asarray(ids[:n]) == prompt[:n]
            common = n if same.all() else int(np.argmin(same))
            if common > best:
                best, donor = common, d
        if best < MIN_PREFIX_REUSE:
            return
        for cache in self._caches():
            cache.copy_prefix(donor, s, best)
        slot.prefilled = slot.output.cached_tokens = best

    def _prefill_chunk(self, s: int, slot: _Slot, limit: int) -> int:
        """The next chunk of slot `s`'s prompt into the caches; the first token after the last."""
        prompt, start = slot.request.prompt_ids, slot.prefilled
        end = min(len(prompt), start + limit)
        n = end - start
        positions = np.arange(start, end, dtype=np.int64)[None]
        feeds = {"input_ids": np.array([prompt[start:end]], dtype=np.int64),
                 "position_ids": positions, "past_lengths": np.array([start], dtype=np.int64),
                 "new_lengths": np.array([n], dtype=np.int64),
                 **self.kv.feeds(s, s + 1, empty=start == 0)}
        out = self._graph(self.pipe.target, feeds, self._present_names("features"), "prefill")
        counts = np.array([n], dtype=np.int64)
        self.kv.commit(out, counts, s)
        if self.gamma:
            self._ingest_context(s, out["features"], positions, counts)
        slot.prefilled = end
        if end == len(prompt):
            u = self.rng.draw_row(s, 1)[:, 0]
            first = select_tokens(out["logits"][:, n - 1], self.temperature[s:s + 1], u)
            self.decoding[s] = True
            self.timer.lap("prefill")
            self._emit({s: [int(first[0])]})
        else:
            self.timer.lap("prefill")
        return n

    def _ingest_context(self, s: int, features: Any, positions: np.ndarray,
                        counts: np.ndarray) -> None:
        """A prompt chunk's context features into slot `s`'s draft cache (the drafted block,
        after a stale anchor, is not used)."""
        self._run_draft(s, s + 1, features, positions, counts, "prefill")

    def _present_names(self, *extra: str) -> list[str]:
        return [n for n in self.pipe.target.output_names if n.startswith("present_")] + list(extra)

    def _graph(self, runner: Any, feeds: dict[str, Any], keep: Sequence[str], stage: str) -> dict:
        self.timer.lap("host")
        out = runner.run(feeds, device_outputs=keep)
        self.timer.lap(stage, graph=stage != "prefill")  # graph_seconds: decode time only
        return out

    def _window(self) -> tuple[int, int, np.ndarray]:
        rows = np.flatnonzero(self.decoding)
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        return lo, hi, self.decoding[lo:hi]

    def _verify_feeds(self, lo: int, hi: int, lengths: np.ndarray, width: int,
                      draft_ids: np.ndarray | None = None) -> tuple[dict[str, Any], np.ndarray]:
        """Target inputs for the anchor + lengths[b] drafts of rows lo:hi, `width` tokens a row."""
        pos = self.kv.lengths[lo:hi]
        ids = np.empty((hi - lo, width), dtype=np.int64)
        ids[:, 0] = self.anchors[lo:hi]
        if width > 1:
            ids[:, 1:] = draft_ids[:, :width - 1]
        positions = pos[:, None] + self.offsets[:width]
        return {"input_ids": ids, "position_ids": positions, "past_lengths": pos,
                "new_lengths": 1 + lengths, **self.kv.feeds(lo, hi)}, positions

    def _target_round(self) -> None:
        """One target token per decoding slot (the SpecVerify rule for 0 drafts, on the host);
        a speculative engine keeps the tokens' context features for the next draft."""
        lo, hi, active = self._window()
        zeros = np.zeros(hi - lo, dtype=np.int64)
        feeds, positions = self._verify_feeds(lo, hi, zeros, 1)
        # features stay on the device: the next draft run reads them there
        out = self._graph(self.pipe.target, feeds, self._present_names("features"),
                          "target_verify")
        uniforms = self.rng.draw(1, self.decoding)[lo:hi, 0]
        tokens = select_tokens(out["logits"][:, 0], self.temperature[lo:hi], uniforms)
        self.timer.lap("spec_verify")
        counts = active.astype(np.int64)
        self.kv.commit(out, counts, lo)
        rows = np.flatnonzero(active)
        if self.gamma:
            self.context.append(out["features"], positions, counts, lo)
            for b in rows:
                self.slots[lo + b].output.accepted.append(0)
                self.slots[lo + b].output.verified.append(0)
            if self.on_round is not None:
                self.on_round(RoundRecord([self.slots[lo + b].request_id for b in rows],
                                          np.zeros((len(rows), 0)), zeros[rows], zeros[rows],
                                          drafted=False))
        self._emit({lo + b: [int(tokens[b])] for b in rows})

    def _speculative_round(self) -> None:
        lo, hi, active = self._window()
        started = time.perf_counter()
        draft_ids, draft_probs, lengths, logits, confidence = self._draft(lo, hi, active)
        room = self.capacity - self.kv.lengths[lo:hi] - 1  # verify tokens beyond the anchor
        lengths = np.clip(lengths, 0, np.maximum(room, 0))
        u_verify = self.rng.draw(self.gamma + 1, self.decoding)[lo:hi]
        # SpecVerify needs G >= 1: with no drafts at all, verify one padded draft of length 0.
        width = 1 + max(int(lengths.max()), 1)
        feeds, positions = self._verify_feeds(lo, hi, lengths, width, draft_ids)
        target_started = time.perf_counter()
        out = self._graph(self.pipe.target, feeds,
                          self._present_names("features", "logits"), "target_verify")
        target_seconds = time.perf_counter() - target_started
        u = np.concatenate([u_verify[:, :width - 1], u_verify[:, -1:]], axis=1)
        verdict = self._graph(self.pipe.verify, {
            "target_logits": out["logits"], "draft_ids": draft_ids[:, :width - 1].copy(),
            "draft_probs": self.pipe.memory.leading(draft_probs, width - 1),
            "verify_lengths": lengths, "temperature": self.temperature[lo:hi],
            "uniforms": u}, (), "spec_verify")
        accepted, tokens = verdict["accepted"], verdict["tokens"]
        counts = np.where(active, accepted + 1, 0)
        self.kv.commit(out, counts, lo)
        self.context.append(out["features"], positions, counts, lo)
        if self.gate is not None:
            self.gate.observe(lo, active, confidence, lengths, np.asarray(accepted),
                              time.perf_counter() - started - target_seconds)
        rows = np.flatnonzero(active)
        for b in rows:
            output = self.slots[lo + b].output
            output.accepted.append(int(accepted[b]))
            output.verified.append(int(lengths[b]))
        if self.on_round is not None:
            self.on_round(RoundRecord([self.slots[lo + b].request_id for b in rows],
                                      np.array(logits[rows], dtype=np.float64),
                                      lengths[rows].copy(), np.asarray(accepted)[rows].copy()))
        self._emit({lo + b: tokens[b, :accepted[b] + 1].tolist() for b in rows})

    def _draft_run(self, lo: int, hi: int, active: np.ndarray) -> dict[str, Any]:
        """The draft graph over rows lo:hi: their waiting context into the draft cache, and the
        block after each row's anchor drafted."""
        return self._run_draft(lo, hi, *self.context.take(lo, hi, active), "draft")

    def _run_draft(self, lo: int, hi: int, features: Any, positions: np.ndarray,
                   counts: np.ndarray, stage: str) -> dict[str, Any]:
        """Context features (counts[b] of them a row) into rows lo:hi's draft cache, and the
        block after each row's anchor (at its target cache length) drafted."""
        block = self.block_ids[lo:hi]
        block[:, 0] = self.anchors[lo:hi]
        pos = self.kv.lengths[lo:hi]
        feeds = {"block_ids": block, "block_positions": pos[:, None] + self.offsets[:self.gamma],
                 "context_features": features, "context_positions": positions,
                 "context_lengths": counts, "past_lengths": self.draft_kv.lengths[lo:hi],
                 **self.draft_kv.feeds(lo, hi)}
        out = self._graph(self.pipe.draft, feeds, self.pipe.draft.output_names, stage)
        self.draft_kv.commit(out, counts, lo)
        return out

    def _draft(self, lo: int, hi: int, active: np.ndarray
               ) -> tuple[np.ndarray, Any, np.ndarray, np.ndarray, np.ndarray]:
        """Draft + markov + schedule: draft ids [rows, G], draft probs, verify lengths [rows],
        raw and calibrated confidences [rows, G]."""
        out = self._draft_run(lo, hi, active)
        uniforms = self.rng.draw(self.gamma, self.decoding)[lo:hi]
        marked = self._graph(self.pipe.markov, {
            "base_logits": out["base_logits"], "hidden_states": out["hidden_states"],
            "anchor_ids": self.anchors[lo:hi], "temperature": self.temperature[lo:hi],
            "uniforms": uniforms}, ("draft_probs",), "markov")
        logits = np.asarray(marked["confidence_logits"])
        calibration = self.pipe.calibration
        confidence = np.zeros((len(self.slots), self.gamma), dtype=np.float64)
        confidence[lo:hi] = calibration.apply(logits) if calibration else sigmoid(logits)
        calibrated = confidence[lo:hi].copy()
        if self.gate is not None:  # corrected by what verification accepted so far
            confidence[lo:hi] = self.gate.corrected(lo + np.arange(hi - lo), calibrated)
        lengths = self.scheduler.verify_lengths(confidence, self.decoding)[lo:hi]
        self.timer.lap("schedule")
        return (marked["draft_ids"], marked["draft_probs"], np.asarray(lengths), logits,
                calibrated)

    # --- tokens out ------------------------------------------------------------------------

    def _emit(self, new_tokens: dict[int, list[int]]) -> None:
        """Append tokens (cut at a stop token, kept, or the budget), stream text, retire."""
        stop_ids = self.pipe.tokenizer.stop_ids
        for s, tokens in new_tokens.items():
            slot = self.slots[s]
            out = slot.output
            tokens = tokens[:slot.request.max_new_tokens - len(out.token_ids)]
            stop = next((k for k, t in enumerate(tokens) if t in stop_ids), None)
            if stop is not None:
                tokens, out.finish_reason = tokens[:stop + 1], "stop"
            out.token_ids.extend(tokens)
            self.anchors[s] = tokens[-1]
            done = stop is not None or len(out.token_ids) >= slot.request.max_new_tokens
            if not done and self.kv.lengths[s] + 1 > self.capacity:  # no room for the anchor
                done, out.finish_reason = True, "context"
            if self.on_text is not None:
                text = slot.decoder.push(tokens) + (slot.decoder.flush() if done else "")
                if text:
                    self.on_text(slot.request_id, text)
            if done:
                self._retire(s)

    def _retire(self, s: int) -> None:
        slot = self.slots[s]
        slot.output.text = self.pipe.tokenizer.decode(slot.output.token_ids)
        self.residue[s] = self._held(s, -1)  # left for a later prompt with the same prefix
        self.slots[s] = None
        self.decoding[s] = False
        self._finish(slot.request_id, slot.output)
        for cache in self._caches():  # its positions no longer count: the buffers may shrink
            cache.lengths[s] = 0
            cache.fit()

    def _finish(self, request_id: int, output: RequestOutput) -> None:
        if self.on_finish is not None:
            self.on_finish(request_id, output)
        else:
            self.finished[request_id] = output

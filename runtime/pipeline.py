"""The confidence-scheduled draft/verify loop over a bundle's four graphs.

One step for a batch of requests (docs/graphs.md): draft (the last step's committed context
features + the block) -> markov (uniforms) -> schedule (calibrated confidences -> a verify
length per row) -> target verify (anchor + l_r drafts per row, padded to the batch max) ->
SpecVerify -> commit (target KV of anchor + accepted drafts, draft KV of the new context, the
pending features) -> emit. Target-only decoding is the same loop with gamma 0: no draft or
markov, a 1-token verify per row, and the SpecVerify rule for verify length 0 (sample p_0 with
one uniform) applied on the host. Finished rows leave the step's row window, and a window
that shrinks from either end is a zero-copy view of every buffer.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .backends import get_backend
from .bundle import Bundle, BundleError
from .calibration import Calibration, sigmoid
from .kv import KVCache
from .sampling import RequestRandomness, select_tokens
from .schedule import AUTO, DEFAULT_THRESHOLD, Scheduler, auto_schedule, make_scheduler
from .sps import SPSTable
from .stats import GenerateResult, RequestOutput, StageTimer
from .tokenizer import TextTokenizer

StreamCallback = Callable[[int, str], None]  # (request index, new text)


class PromptError(ValueError):
    """A prompt this bundle cannot take (empty, or longer than its context)."""


class Pipeline:
    """A loaded bundle that generates text for batches of prompts. Runners are
    backends/base.py `Runner`s (`run`, `memory`, `input_shapes`, `input_dtypes`)."""

    def __init__(self, runners: dict[str, Any], tokenizer: TextTokenizer, *, mask_token_id: int,
                 context_limit: int, calibration: Calibration | None = None,
                 sps: SPSTable | None = None, schedule: str = AUTO,
                 threshold: float = DEFAULT_THRESHOLD) -> None:
        self.runners, self.tokenizer = runners, tokenizer
        self.target, self.draft = runners["target"], runners["draft"]
        self.markov, self.verify = runners["markov"], runners["verify"]
        self.memory = self.target.memory
        self.gamma = int(self.draft.input_shapes["block_ids"][1])
        self.mask_token_id, self.context_limit = mask_token_id, context_limit
        self.calibration, self.sps = calibration, sps
        self.schedule = auto_schedule(sps) if schedule == AUTO else schedule
        self.threshold = threshold
        make_scheduler(self.schedule, gamma=self.gamma, threshold=threshold, sps=sps)  # fail early

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, *, backend: str = "auto",
                    schedule: str = AUTO, threshold: float = DEFAULT_THRESHOLD,
                    threads: int | None = None) -> Pipeline:
        """Load and check a bundle (or export folder). `backend`: auto, cpu or cuda, the device
        of an ONNX Runtime bundle (a TensorRT bundle runs on the GPU: auto or cuda); `threads`
        overrides an ONNX Runtime bundle's intra-op thread count; `schedule` is the default of
        `generate` (`auto`: hardware-aware with an SPS table, else the confidence threshold)."""
        bundle = Bundle.load(path)
        runners = get_backend(bundle.backend).load_runners(bundle, backend, threads)
        try:
            return cls._over_runners(bundle, runners, schedule, threshold)
        except BaseException:
            for runner in runners.values():
                runner.close()
            raise

    @classmethod
    def _over_runners(cls, bundle: Bundle, runners: dict[str, Any], schedule: str,
                      threshold: float) -> Pipeline:
        path, manifest = bundle.root, bundle.manifest
        export = manifest.get("export") or {}  # an export folder: export.json as it is
        draft_config = (manifest.get("models") or {}).get("draft") or export
        target_config = (manifest.get("models") or {}).get("target") or export
        limits = [x for x in (bundle.shapes.get("max_context"),
                              target_config.get("max_position_embeddings")) if x]
        if "mask_token_id" not in draft_config:
            raise BundleError(f"{path}: the drafter's mask_token_id is not recorded")
        gamma = int(runners["draft"].input_shapes["block_ids"][1])
        calibration = (Calibration.load(bundle.calibration_path, gamma=gamma)
                       if bundle.calibration_path else None)
        sps = SPSTable.load(bundle.sps_table_path) if bundle.sps_table_path else None
        stop_ids = (manifest.get("tokenizer") or {}).get("stop_token_ids") \
            or export.get("stop_token_ids")
        return cls(runners, TextTokenizer(bundle.tokenizer_dir, stop_ids),
                   mask_token_id=int(draft_config["mask_token_id"]),
                   context_limit=min(int(x) for x in limits) if limits else 1 << 30,
                   calibration=calibration, sps=sps, schedule=schedule, threshold=threshold)

    def close(self) -> None:
        """Release every runner's sessions, engines and device memory (idempotent)."""
        for runner in self.runners.values():
            runner.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def encode(self, prompts: Sequence[str] | Sequence[Sequence[int]], *,
               raw: bool = False) -> list[list[int]]:
        """Token ids per prompt; refuses empty ones and ones that leave no room to generate."""
        encoded = [list(p) if not isinstance(p, str) else
                   (self.tokenizer.encode_prompt(p, raw=raw) if p.strip() else []) for p in prompts]
        for i, ids in enumerate(encoded):
            if not ids:
                raise PromptError(f"prompt {i} is empty")
            if len(ids) >= self.context_limit:
                raise PromptError(f"prompt {i} has {len(ids)} tokens; the bundle's context limit "
                                  f"is {self.context_limit}, which leaves no room to generate")
        return encoded

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], *,
                 max_new_tokens: int = 128, temperature: float = 0.0,
                 seed: int | Sequence[int] = 0, schedule: str | Scheduler | None = None,
                 threshold: float | None = None, target_only: bool = False, raw: bool = False,
                 stream: StreamCallback | None = None) -> GenerateResult:
        """Generate for a batch. Every row uses `seed` (or its own from a list), so a row gives
        the same tokens alone or batched; token ids keep a final stop token, text drops it.
        `schedule` is a scheduler name (default: the pipeline's; `auto` as in `auto_schedule`)
        or an object with `verify_lengths` and `reset`."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompt_ids = self.encode(prompts, raw=raw)
        seeds = [seed] * len(prompt_ids) if isinstance(seed, int) else list(seed)
        if len(seeds) != len(prompt_ids):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
        gamma = 0 if target_only else self.gamma
        scheduler = None if target_only else schedule
        if not target_only and not hasattr(schedule, "verify_lengths"):
            scheduler = make_scheduler(schedule or self.schedule, gamma=gamma, sps=self.sps,
                                       threshold=self.threshold if threshold is None else threshold)
        if scheduler is not None:
            scheduler.reset()
        run = _Run(self, prompt_ids, gamma, max_new_tokens, temperature, seeds, stream)
        run.prefill()
        while run.active.any():
            run.step(scheduler)
        return run.result()


class _Run:
    """The state of one generate() call: caches, pending features, outputs."""

    def __init__(self, pipe: Pipeline, prompt_ids: list[list[int]], gamma: int,
                 max_new_tokens: int, temperature: float, seeds: list[int],
                 stream: StreamCallback | None) -> None:
        self.pipe, self.gamma, self.max_new = pipe, gamma, max_new_tokens
        self.prompt_lengths = np.array([len(p) for p in prompt_ids], dtype=np.int64)
        self.prompt_ids = prompt_ids
        batch = len(prompt_ids)
        self.capacity = min(int(self.prompt_lengths.max()) + max_new_tokens + gamma + 1,
                            pipe.context_limit)
        self.kv = KVCache.for_graph(pipe.target, batch=batch, capacity=self.capacity)
        if gamma:
            self.draft_kv = KVCache.for_graph(pipe.draft, batch=batch, capacity=self.capacity)
            self.block_ids = np.full((batch, gamma), pipe.mask_token_id, dtype=np.int64)
        self.temperature = np.full(batch, temperature, dtype=np.float32)
        self.rng = RequestRandomness(seeds)
        self.active = np.ones(batch, dtype=bool)
        self.anchors = np.zeros(batch, dtype=np.int64)
        self.outputs = [RequestOutput("", [], len(p)) for p in prompt_ids]
        self.decoders = [pipe.tokenizer.stream() for _ in prompt_ids]
        self.stream, self.steps = stream, 0
        self.offsets = np.arange(max(gamma, 1) + 1, dtype=np.int64)

    def _graph(self, runner: Any, feeds: dict[str, Any], keep: Sequence[str], stage: str) -> dict:
        self.timer.lap("host")
        out = runner.run(feeds, device_outputs=keep)
        self.timer.lap(stage, graph=True)
        return out

    def prefill(self) -> None:
        """All prompts in one padded target run; first token from each row's last logits."""
        self.timer = StageTimer()
        batch, width = len(self.prompt_ids), int(self.prompt_lengths.max())
        ids = np.zeros((batch, width), dtype=np.int64)
        for b, p in enumerate(self.prompt_ids):
            ids[b, :len(p)] = p
        positions = np.broadcast_to(np.arange(width, dtype=np.int64), (batch, width)).copy()
        feeds = {"input_ids": ids, "position_ids": positions,
                 "past_lengths": np.zeros(batch, dtype=np.int64),
                 "new_lengths": self.prompt_lengths, **self.kv.feeds(0, batch, empty=True)}
        out = self.pipe.target.run(feeds, device_outputs=self._present_names("features"))
        self.kv.commit(out, self.prompt_lengths)
        self.pending = (out["features"], positions, self.prompt_lengths.copy(), 0)
        last = out["logits"][np.arange(batch), self.prompt_lengths - 1]
        first = select_tokens(last, self.temperature, self.rng.draw(1, self.active)[:, 0])
        self.timer.lap("prefill")
        self._emit([[int(t)] for t in first], 0)

    def _present_names(self, *extra: str) -> list[str]:
        return [n for n in self.pipe.target.output_names if n.startswith("present_")] + list(extra)

    def step(self, scheduler: Any) -> None:
        """One draft/verify round for the rows still active."""
        rows = np.flatnonzero(self.active)
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        active = self.active[lo:hi]
        pos = self.kv.lengths[lo:hi]
        room = self.capacity - pos - 1  # verify tokens beyond the anchor that still fit
        if self.gamma:
            draft_ids, draft_probs, lengths = self._draft(lo, hi, active, pos, scheduler)
            lengths = np.clip(lengths, 0, np.maximum(room, 0))
            u_verify = self.rng.draw(self.gamma + 1, self.active)[lo:hi]
        else:
            lengths = np.zeros(hi - lo, dtype=np.int64)
        # SpecVerify needs G >= 1: with no drafts at all, verify one padded draft of length 0.
        width = 1 + max(int(lengths.max()), 1 if self.gamma else 0)
        ids = np.empty((hi - lo, width), dtype=np.int64)
        ids[:, 0] = self.anchors[lo:hi]
        if width > 1:
            ids[:, 1:] = draft_ids[:, :width - 1]
        positions = pos[:, None] + self.offsets[:width]
        feeds = {"input_ids": ids, "position_ids": positions, "past_lengths": pos,
                 "new_lengths": 1 + lengths, **self.kv.feeds(lo, hi)}
        keep = self._present_names("features", *(["logits"] if self.gamma else []))
        out = self._graph(self.pipe.target, feeds, keep, "target_verify")
        if self.gamma:
            memory = self.pipe.memory
            u = np.concatenate([u_verify[:, :width - 1], u_verify[:, -1:]], axis=1)
            verdict = self._graph(self.pipe.verify, {
                "target_logits": out["logits"], "draft_ids": draft_ids[:, :width - 1].copy(),
                "draft_probs": memory.leading(draft_probs, width - 1), "verify_lengths": lengths,
                "temperature": self.temperature[lo:hi], "uniforms": u}, (), "spec_verify")
            accepted, tokens = verdict["accepted"], verdict["tokens"]
        else:
            uniforms = self.rng.draw(1, self.active)[lo:hi, 0]
            tokens = select_tokens(out["logits"][:, 0], self.temperature[lo:hi], uniforms)[:, None]
            accepted = np.zeros(hi - lo, dtype=np.int64)
            self.timer.lap("spec_verify")
        counts = np.where(active, accepted + 1, 0)
        self.kv.commit(out, counts, lo)
        self.pending = (out["features"], positions, counts, lo)
        for b in np.flatnonzero(active):
            if self.gamma:
                self.outputs[lo + b].accepted.append(int(accepted[b]))
                self.outputs[lo + b].verified.append(int(lengths[b]))
        self.steps += 1
        self._emit([tokens[b, :accepted[b] + 1].tolist() if active[b] else []
                    for b in range(hi - lo)], lo)

    def _draft(self, lo: int, hi: int, active: np.ndarray, pos: np.ndarray,
               scheduler: Any) -> tuple[np.ndarray, Any, np.ndarray]:
        """Draft + markov + schedule: (draft ids [rows, G], draft probs, verify lengths [rows])."""
        memory = self.pipe.memory
        features, ctx_positions, ctx_counts, ctx_lo = self.pending
        counts = np.where(active, ctx_counts[lo - ctx_lo:hi - ctx_lo], 0)
        block = self.block_ids[lo:hi]
        block[:, 0] = self.anchors[lo:hi]
        feeds = {"block_ids": block, "block_positions": pos[:, None] + self.offsets[:self.gamma],
                 "context_features": memory.rows(features, lo - ctx_lo, hi - ctx_lo),
                 "context_positions": ctx_positions[lo - ctx_lo:hi - ctx_lo],
                 "context_lengths": counts, "past_lengths": self.draft_kv.lengths[lo:hi],
                 **self.draft_kv.feeds(lo, hi)}
        names = self.pipe.draft.output_names
        out = self._graph(self.pipe.draft, feeds, names, "draft")
        self.draft_kv.commit(out, counts, lo)
        uniforms = self.rng.draw(self.gamma, self.active)[lo:hi]
        marked = self._graph(self.pipe.markov, {
            "base_logits": out["base_logits"], "hidden_states": out["hidden_states"],
            "anchor_ids": self.anchors[lo:hi], "temperature": self.temperature[lo:hi],
            "uniforms": uniforms}, ("draft_probs",), "markov")
        logits = marked["confidence_logits"]
        calibration = self.pipe.calibration
        confidence = calibration.apply(logits) if calibration else sigmoid(logits)
        lengths = scheduler.verify_lengths(confidence, active)
        self.timer.lap("schedule")
        return marked["draft_ids"], marked["draft_probs"], lengths

    def _emit(self, new_tokens: list[list[int]], lo: int) -> None:
        """Append tokens (cut at a stop token, kept, or the budget), stream text, retire rows."""
        stop_ids = self.pipe.tokenizer.stop_ids
        for i, tokens in enumerate(new_tokens):
            b = lo + i
            if not tokens:
                continue
            out = self.outputs[b]
            tokens = tokens[:self.max_new - len(out.token_ids)]
            stop = next((k for k, t in enumerate(tokens) if t in stop_ids), None)
            if stop is not None:
                tokens, out.finish_reason = tokens[:stop + 1], "stop"
            out.token_ids.extend(tokens)
            self.anchors[b] = tokens[-1]
            if stop is not None or len(out.token_ids) >= self.max_new:
                self.active[b] = False
            elif self.kv.lengths[b] + 1 > self.capacity:  # no room left for the next anchor
                self.active[b], out.finish_reason = False, "context"
            if self.stream is not None:
                text = self.decoders[b].push(tokens)
                text += self.decoders[b].flush() if not self.active[b] else ""
                if text:
                    self.stream(b, text)

    def result(self) -> GenerateResult:
        self.timer.lap("host")
        for out in self.outputs:
            out.text = self.pipe.tokenizer.decode(out.token_ids)
        return GenerateResult(self.outputs, dict(self.timer.seconds), self.timer.graph_seconds,
                              self.steps, self.gamma)

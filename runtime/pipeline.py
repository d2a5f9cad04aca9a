"""A loaded bundle and the batch API over it.

`Pipeline.from_bundle` checks a bundle and loads one runner per graph through its backend;
`generate` runs a batch of prompts to completion on the continuous-batching `Engine`
(engine.py: the confidence-scheduled draft/verify loop, docs/graphs.md), one slot per prompt.
Target-only decoding is the same engine with gamma 0.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from .backends import get_backend
from .bundle import Bundle, BundleError
from .calibration import Calibration
from .draft_gate import DraftGate
from .engine import Engine, Request, RoundRecord
from .schedule import AUTO, DEFAULT_THRESHOLD, Scheduler, auto_schedule, make_scheduler
from .sps import SPSTable
from .stats import GenerateResult
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
                 threshold: float = DEFAULT_THRESHOLD, max_batch: int | None = None) -> None:
        self.runners, self.tokenizer = runners, tokenizer
        self.target, self.draft = runners["target"], runners["draft"]
        self.markov, self.verify = runners["markov"], runners["verify"]
        self.memory = self.target.memory
        self.gamma = int(self.draft.input_shapes["block_ids"][1])
        self.mask_token_id, self.context_limit = mask_token_id, context_limit
        self.max_batch = max_batch  # the batch the bundle was built for (None: not recorded)
        self.calibration, self.sps = calibration, sps
        self.schedule = auto_schedule(sps) if schedule == AUTO else schedule
        self.threshold = threshold
        # the last call's draft gate: the next call's engine starts from its evidence
        self._gate: DraftGate | None = None
        self.make_scheduler()  # fail early on a scheduler this bundle cannot run

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
                   calibration=calibration, sps=sps, schedule=schedule, threshold=threshold,
                   max_batch=bundle.shapes.get("max_batch"))

    def make_scheduler(self, name: str | None = None, threshold: float | None = None
                       ) -> Scheduler:
        """A scheduler by name (default: the pipeline's) for this bundle's engine, whose
        graphs pad every verify row to the longest (`make_scheduler(padded=True)`)."""
        return make_scheduler(name or self.schedule, gamma=self.gamma, sps=self.sps,
                              threshold=self.threshold if threshold is None else threshold,
                              padded=True)

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
                 stream: StreamCallback | None = None,
                 on_round: Callable[[RoundRecord], None] | None = None) -> GenerateResult:
        """Generate for a batch. Every row uses `seed` (or its own from a list), so a row gives
        the same tokens alone or batched; token ids keep a final stop token, text drops it.
        `schedule` is a scheduler name (default: the pipeline's; `auto` as in `auto_schedule`)
        or an object with `verify_lengths` and `reset`; `on_round` sees every speculative round
        (engine.RoundRecord: request indices, raw confidence logits, verify lengths, accepted).
        A client of the continuous-batching engine: one slot per prompt, every prompt prefilled
        before the first round."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompt_ids = self.encode(prompts, raw=raw)
        seeds = [seed] * len(prompt_ids) if isinstance(seed, int) else list(seed)
        if len(seeds) != len(prompt_ids):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
        gamma = 0 if target_only else self.gamma
        scheduler = None if target_only else schedule
        if not target_only and not hasattr(schedule, "verify_lengths"):
            scheduler = self.make_scheduler(schedule, threshold)
        if scheduler is not None:
            scheduler.reset()
        capacity = min(max(len(p) for p in prompt_ids) + max_new_tokens + gamma + 1,
                       self.context_limit)
        on_text = None if stream is None else (lambda rid, text: stream(index[rid], text))
        engine = Engine(self, slots=len(prompt_ids), capacity=capacity, gamma=gamma,
                        scheduler=scheduler, on_text=on_text, on_round=on_round,
                        prefill_budget=sum(len(p) for p in prompt_ids), gate_from=self._gate)
        index = {engine.submit(Request(p, max_new_tokens, temperature, s)): i
                 for i, (p, s) in enumerate(zip(prompt_ids, seeds))}
        while engine.has_work():
            engine.step()
        engine.timer.lap("host")
        self._gate = engine.gate or self._gate  # what drafting cost and paid, for the next call
        return GenerateResult([engine.finished[rid] for rid in index],
                              dict(engine.timer.seconds), engine.timer.graph_seconds,
                              engine.steps, gamma)

"""STS calibration of a built bundle's confidence head (`dspark-export calibrate`).

The bundle runs on calibration prompts (by default the offline corpus of `distill_data`, never
the evaluation sets in `shared/eval/`) with the fixed full-block schedule, so every draft
position is verified whenever it fits in the context. For every round of every request the
engine's round hook gives the raw confidence logits z_1..z_G (the markov graph's `confidence_logits`) and
what verification did: the accepted-prefix label of `dspark_runtime.calibration` (1 at position
k if drafts 1..k all survived, 0 otherwise, unknown only past the verify window when nothing in
it failed). STS (`fit_calibration`) then fits one temperature per position left to right, and
`calibration.json` is written into the bundle through `update_bundle`, which re-hashes it into
the manifest, so `Bundle.load` keeps verifying the bundle and `Pipeline.from_bundle` applies it.

The calibration target is acceptance under the verification temperature used here
(`temperature`, default 0: greedy, accept while draft == argmax of the target). Acceptance at
temperature 1 (min(1, p/q) with drafts sampled from q) is a different event with different
rates: calibrate at the temperature the bundle will serve.

Nothing here imports torch: only the bundle's ONNX graphs run.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dspark_runtime.bundle import BundleError, read_manifest
from dspark_runtime.calibration import CALIBRATION_FILENAME, Calibration, fit_calibration
from dspark_runtime.engine import RoundRecord

ROUNDS_FORMAT = "dspark-calibration-rounds/1"
DEFAULT_NUM_PROMPTS = 64
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_BATCH = 8


class CalibrationError(ValueError):
    """Calibration cannot run on this input; the message says why."""


# ------------------------------------------------------------------------------- recorded data


@dataclass
class Rounds:
    """Draft/verify rounds of a batch of requests, one row per (request, round)."""

    logits: np.ndarray  # float64 [N, G]: raw confidence logits
    accepted: np.ndarray  # int64 [N]: drafts accepted
    verified: np.ndarray  # int64 [N]: drafts verified (G unless the context ran out)
    request: np.ndarray  # int64 [N]: request index
    step: np.ndarray  # int64 [N]: round index within the request
    temperature: float = 0.0

    @property
    def gamma(self) -> int:
        return int(self.logits.shape[1])

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def labels(self) -> np.ndarray:
        """Accepted-prefix labels [N, G]: 1/0 where known, NaN where not verified.

        Past the first failure the prefix label is 0 whether or not the position was verified;
        past the verify window of a round in which every verified draft survived it is unknown.
        """
        j = np.arange(1, self.gamma + 1)[None, :]
        acc, ver = self.accepted[:, None], self.verified[:, None]
        labels = np.where(j <= acc, 1.0, 0.0)
        known = (j <= ver) | (acc < ver)
        return np.where(known, labels, np.nan)

    def tau(self) -> float:
        """Mean accepted drafts per round + 1 (the bonus/correction token)."""
        return float(self.accepted.mean()) + 1.0 if len(self) else math.nan

    def acceptance_per_position(self) -> list[float]:
        """P(draft k accepted | drafts < k accepted and k verified), k = 1..G."""
        rates = []
        for k in range(1, self.gamma + 1):
            reached = (self.verified >= k) & (self.accepted >= k - 1)
            rates.append(float((self.accepted[reached] >= k).mean()) if reached.any()
                         else math.nan)
        return rates

    @classmethod
    def concatenate(cls, parts: Sequence[Rounds]) -> Rounds:
        if not parts:
            raise CalibrationError("no rounds were recorded")
        return cls(*(np.concatenate([getattr(p, k) for p in parts])
                     for k in ("logits", "accepted", "verified", "request", "step")),
                   temperature=parts[0].temperature)

    def to_json(self, **meta: Any) -> dict:
        """Grouped by request; logits rounded to 1e-5 (far below any calibration effect)."""
        requests = []
        for r in np.unique(self.request):
            rows = np.flatnonzero(self.request == r)
            rows = rows[np.argsort(self.step[rows], kind="stable")]
            requests.append({"accepted": self.accepted[rows].tolist(),
                             "verified": self.verified[rows].tolist(),
                             "logits": np.round(self.logits[rows], 5).tolist()})
        return {"format": ROUNDS_FORMAT, "gamma": self.gamma, "temperature": self.temperature,
                "rounds": len(self), "tau": self.tau(), **meta, "requests": requests}

    @classmethod
    def from_json(cls, data: Any, source: str = "rounds") -> Rounds:
        if not isinstance(data, dict) or data.get("format") != ROUNDS_FORMAT:
            raise CalibrationError(f"{source}: not a recorded-rounds file (format "
                                   f"{ROUNDS_FORMAT!r} expected)")
        gamma = int(data["gamma"])
        cols: dict[str, list] = {"logits": [], "accepted": [], "verified": [], "request": [],
                                 "step": []}
        for r, req in enumerate(data["requests"]):
            n = len(req["accepted"])
            if len(req["verified"]) != n or len(req["logits"]) != n:
                raise CalibrationError(f"{source}: request {r} has columns of unequal length")
            cols["logits"].extend(req["logits"])
            cols["accepted"].extend(req["accepted"])
            cols["verified"].extend(req["verified"])
            cols["request"].extend([r] * n)
            cols["step"].extend(range(n))
        logits = np.asarray(cols["logits"], dtype=np.float64).reshape(-1, gamma)
        rounds = cls(logits, *(np.asarray(cols[k], dtype=np.int64)
                               for k in ("accepted", "verified", "request", "step")),
                     temperature=float(data.get("temperature", 0.0)))
        if np.any(rounds.accepted > rounds.verified) or np.any(rounds.verified > gamma) \
                or np.any(rounds.accepted < 0):
            raise CalibrationError(f"{source}: accepted/verified counts out of range")
        return rounds

    def save(self, path: str | Path, **meta: Any) -> Path:
        from dspark_runtime.sps import write_json_atomic

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, self.to_json(**meta))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Rounds:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CalibrationError(f"{path}: cannot read recorded rounds ({exc})") from exc
        return cls.from_json(data, source=str(path))


# ------------------------------------------------------------------------------- recording


def record_rounds(pipe: Any, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                  temperature: float = 0.0, seed: int = 0) -> Rounds:
    """Run one batch with the full-block schedule; every round of each request, in order."""
    rounds: list[RoundRecord] = []
    pipe.generate([list(p) for p in prompt_ids], max_new_tokens=max_new_tokens,
                  temperature=temperature, seed=[seed + i for i in range(len(prompt_ids))],
                  schedule="fixed", on_round=rounds.append)
    logits, accepted, verified, request, step = [], [], [], [], []
    seen: dict[int, int] = {}  # rounds so far per request
    for record in rounds:
        for i, r in enumerate(record.request_ids):
            logits.append(record.confidence_logits[i])
            accepted.append(int(record.accepted[i]))
            verified.append(int(record.verify_lengths[i]))
            request.append(r)
            step.append(seen.get(r, 0))
            seen[r] = seen.get(r, 0) + 1
    return Rounds(np.asarray(logits, dtype=np.float64).reshape(-1, pipe.gamma),
                  np.asarray(accepted, dtype=np.int64), np.asarray(verified, dtype=np.int64),
                  np.asarray(request, dtype=np.int64), np.asarray(step, dtype=np.int64),
                  temperature=float(temperature))


def record_prompts(pipe: Any, prompts: Sequence[str], *, max_new_tokens: int,
                   temperature: float = 0.0, seed: int = 0, batch_size: int = DEFAULT_BATCH,
                   raw: bool = False,
                   on_batch: Callable[[int, int, Rounds], None] | None = None) -> Rounds:
    """`record_rounds` over `prompts` in batches of `batch_size` (chat template unless raw)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    ids = pipe.encode(list(prompts), raw=raw)
    parts = []
    n_batches = -(-len(ids) // batch_size)
    for b in range(n_batches):
        chunk = ids[b * batch_size:(b + 1) * batch_size]
        part = record_rounds(pipe, chunk, max_new_tokens=max_new_tokens,
                             temperature=temperature, seed=seed + b * batch_size)
        part.request += b * batch_size  # request index == prompt index
        parts.append(part)
        if on_batch is not None:
            on_batch(b + 1, n_batches, part)
    return Rounds.concatenate(parts)


# ------------------------------------------------------------------------------- prompts


def calibration_prompts(prompts_file: str | Path | None, num_prompts: int | None,
                        seed: int = 0) -> tuple[list[str], dict]:
    """Prompt texts and a description of where they came from (recorded in calibration.json).

    Default: `num_prompts` (64) prompts of the offline corpus. A file (jsonl with `prompt` or
    `turns`, or plain lines) is refused if it lies in the evaluation folder; `num_prompts`
    then keeps its first prompts.
    """
    from dspark_export.distill_data import (DistillDataError, _is_eval_file, build_corpus,
                                            corpus_digest, load_prompts)

    if num_prompts is not None and num_prompts < 1:
        raise CalibrationError(f"the number of prompts must be >= 1, got {num_prompts}")
    try:
        if prompts_file is None:
            prompts = build_corpus(num_prompts or DEFAULT_NUM_PROMPTS, seed)
            source = {"source": "distill_data.build_corpus", "seed": seed}
        else:
            path = Path(prompts_file)
            if _is_eval_file(path):
                raise CalibrationError(
                    f"{path}: this is an evaluation prompt file (shared/eval/); calibrating on "
                    "the prompts the bundle is benchmarked on would leak them into the "
                    "schedule. Use --prompts with other prompts, or the default corpus")
            prompts = load_prompts(path)[:num_prompts]
            source = {"source": str(path)}
    except DistillDataError as exc:
        raise CalibrationError(str(exc)) from exc
    source.update(n_prompts=len(prompts), digest=corpus_digest(prompts))
    return [p.text for p in prompts], source


# ------------------------------------------------------------------------------- bundle


def check_calibratable(bundle: str | Path) -> dict:
    """The bundle's manifest, or a clear error for what cannot take a calibration."""
    try:
        manifest = read_manifest(bundle)
    except BundleError as exc:
        raise CalibrationError(str(exc)) from exc
    if manifest.get("export_folder"):
        raise CalibrationError(
            f"{bundle}: this is an export folder (export.json, no manifest.json), not a built "
            "bundle; calibration.json is recorded in a bundle's manifest with its sha256. "
            "Build one first: dspark-export build --out BUNDLE")
    return manifest


def write_calibration(bundle: str | Path, calibration: Calibration,
                      extra: dict | None = None) -> dict:
    """calibration.json into the bundle by rename, its sha256 and name into the manifest."""
    from dspark_export.build.bundle_writer import update_bundle

    payload = {**calibration.to_json(), **(extra or {})}
    data = (json.dumps(payload, indent=2, allow_nan=False) + "\n").encode()
    return update_bundle(bundle, {CALIBRATION_FILENAME: data},
                         {"calibration": CALIBRATION_FILENAME})


def fit_rounds(rounds: Rounds) -> Calibration:
    labels = rounds.labels()
    if len(rounds) == 0 or np.isnan(labels).all():
        raise CalibrationError("no verified draft positions were recorded; use more prompts "
                               "or more new tokens")
    return fit_calibration(rounds.logits, labels)


def calibrate_bundle(bundle: str | Path, prompts: Sequence[str], *,
                     max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0,
                     seed: int = 0, batch_size: int | None = None, backend: str = "auto",
                     threads: int | None = None, prompt_source: dict | None = None,
                     on_batch: Callable[[int, int, Rounds], None] | None = None,
                     ) -> tuple[Calibration, Rounds]:
    """Record, fit and write: the whole `calibrate` command minus the printing."""
    from dspark_runtime.pipeline import Pipeline

    manifest = check_calibratable(bundle)
    if temperature < 0 or not math.isfinite(temperature):
        raise CalibrationError(f"temperature must be a finite number >= 0, got {temperature}")
    max_batch = (manifest.get("shapes") or {}).get("max_batch") or DEFAULT_BATCH
    batch_size = batch_size or min(DEFAULT_BATCH, int(max_batch))
    pipe = Pipeline.from_bundle(bundle, backend=backend, schedule="fixed", threads=threads)
    rounds = record_prompts(pipe, prompts, max_new_tokens=max_new_tokens,
                            temperature=temperature, seed=seed, batch_size=batch_size,
                            on_batch=on_batch)
    calibration = fit_rounds(rounds)
    write_calibration(bundle, calibration, {"fitted_on": {
        "prompts": prompt_source or {"n_prompts": len(prompts)},
        "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed,
        "schedule": "fixed (full block)", "rounds": len(rounds), "tau": rounds.tau()}})
    return calibration, rounds


def format_report(calibration: Calibration) -> str:
    """Per-position table of the fitted temperatures, ECE and AUC before/after."""
    def f(v: float | None, digits: int = 4) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    report = calibration.metrics
    lines = [f"{'pos':>3} {'n':>7} {'T':>7} {'ECE before':>11} {'ECE after':>10} "
             f"{'AUC before':>11} {'AUC after':>10}"]
    for p, t in zip(report["positions"], calibration.temperatures):
        lines.append(f"{p['position']:>3} {p['n']:>7} {t:>7.3f} {f(p['ece_before']):>11} "
                     f"{f(p['ece_after']):>10} {f(p['auc_before']):>11} {f(p['auc_after']):>10}")
    m = report["mean"]
    lines.append(f"{'all':>3} {calibration.n_samples:>7} {'':>7} {f(m['ece_before']):>11} "
                 f"{f(m['ece_after']):>10} {f(m['auc_before']):>11} {f(m['auc_after']):>10}")
    return "\n".join(lines)

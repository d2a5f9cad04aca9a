"""What a generation reports: per-request acceptance, per-stage times, throughput.

Definitions match the PyTorch reference (`dspark_export.decode.DecodeStats`): tau counts the
correction/bonus token (mean accepted drafts per round + 1), acceptance at position k is
P(draft k accepted | drafts < k accepted and k verified), and tokens/s is new tokens over the
decode time (after prefill).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

STAGES = ("prefill", "draft", "markov", "schedule", "target_verify", "spec_verify", "host")


@dataclass
class RequestOutput:
    """One request's tokens, text and acceptance record."""

    text: str
    token_ids: list[int]
    prompt_length: int
    finish_reason: str = "length"  # "stop" | "length" | "context" | "cancelled" | "error"
    accepted: list[int] = field(default_factory=list)  # accepted drafts per round
    verified: list[int] = field(default_factory=list)  # drafts submitted per round
    cached_tokens: int = 0  # prompt tokens copied from another slot's caches, not prefilled

    @property
    def tau(self) -> float:
        return sum(self.accepted) / len(self.accepted) + 1.0 if self.accepted else 1.0

    def acceptance_per_position(self) -> list[float]:
        """P(draft k accepted | drafts < k accepted and k verified), k = 1..max verified."""
        rates = []
        for k in range(1, max(self.verified, default=0) + 1):
            reached = sum(1 for a, v in zip(self.accepted, self.verified) if v >= k and a >= k - 1)
            passed = sum(1 for a in self.accepted if a >= k)
            rates.append(passed / reached if reached else math.nan)
        return rates


class StageTimer:
    """Wall time per stage; `host` is whatever a step spends outside the timed stages."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.graph_seconds = 0.0  # decode time spent inside graph runs
        self._mark = time.perf_counter()

    def lap(self, stage: str, *, graph: bool = False) -> None:
        """Charge the time since the previous lap to `stage` (a graph run if `graph`)."""
        now = time.perf_counter()
        self.seconds[stage] += now - self._mark
        if graph:
            self.graph_seconds += now - self._mark
        self._mark = now


@dataclass
class GenerateResult:
    """A batch's outputs and the timing of the whole run."""

    requests: list[RequestOutput]
    seconds: dict[str, float]
    graph_seconds: float
    steps: int
    gamma: int

    @property
    def decode_s(self) -> float:
        return sum(v for k, v in self.seconds.items() if k != "prefill")

    @property
    def new_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.requests)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def tau(self) -> float:
        """Mean tokens per request-round over the batch (1.0 for target-only)."""
        rounds = sum(len(r.accepted) for r in self.requests)
        accepted = sum(sum(r.accepted) for r in self.requests)
        return accepted / rounds + 1.0 if rounds else 1.0

    @property
    def host_overhead(self) -> float:
        """Fraction of decode time spent outside graph runs (scheduling, commits, sampling...)."""
        return 1.0 - self.graph_seconds / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        first = self.requests[0]
        return {
            "text": first.text,
            "token_ids": first.token_ids,
            "tau": self.tau,
            "tokens_per_s": self.tokens_per_s,
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "gamma": self.gamma,
            "acceptance_per_position": _json_floats(first.acceptance_per_position()),
            "host_overhead": self.host_overhead,
            "stage_seconds": dict(self.seconds),
            "requests": [{"text": r.text, "token_ids": r.token_ids, "tau": r.tau,
                          "finish_reason": r.finish_reason, "prompt_length": r.prompt_length,
                          "acceptance_per_position": _json_floats(r.acceptance_per_position())}
                         for r in self.requests],
        }


def _json_floats(values: list[float]) -> list[float | None]:
    """NaN (a position never reached) is not JSON: write null."""
    return [None if math.isnan(v) else v for v in values]

"""Prometheus metrics of one server, in a registry of its own (several apps per process in tests)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..engine import RoundRecord

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """Requests, queue depth, running batch, tokens, tau, verify length, TTFT and ITL."""

    def __init__(self, gamma: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dspark_requests", "Finished requests by outcome", ["outcome"],
                                registry=r)
        self.waiting = Gauge("dspark_queue_depth", "Requests waiting for a slot", registry=r)
        self.running = Gauge("dspark_running_requests", "Requests holding a slot", registry=r)
        self.prompt_tokens = Counter("dspark_prompt_tokens", "Prompt tokens of finished "
                                     "requests", registry=r)
        self.cached_prompt_tokens = Counter(
            "dspark_cached_prompt_tokens", "Prompt tokens copied from another slot's caches "
            "instead of prefilled", registry=r)
        self.generated = Counter("dspark_generated_tokens", "Tokens generated", registry=r)
        rounds = [float(k) for k in range(1, gamma + 2)]
        self.round_tokens = Histogram(
            "dspark_round_tokens", "Tokens committed per request per round (mean: tau)",
            buckets=rounds, registry=r)
        self.verify_length = Histogram(
            "dspark_verify_length", "Drafts verified per request per round",
            buckets=[float(k) for k in range(0, gamma + 1)], registry=r)
        self.rounds = Counter("dspark_rounds", "Decode rounds: drafted (speculative), or "
                              "target-only where the draft gate found drafting would not pay",
                              ["kind"], registry=r)
        self.ttft = Histogram("dspark_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("dspark_inter_token_latency_seconds",
                             "Mean time between output tokens, per request", buckets=_LATENCY,
                             registry=r)

    def load(self, waiting: int, running: int) -> None:
        self.waiting.set(waiting)
        self.running.set(running)

    def round(self, record: RoundRecord) -> None:
        self.rounds.labels("drafted" if record.drafted else "target").inc()
        for accepted, verified in zip(record.accepted, record.verify_lengths):
            self.round_tokens.observe(int(accepted) + 1)
            self.verify_length.observe(int(verified))

"""Prometheus metrics of one server (prometheus-client, a registry per app so several apps can live in
one process, as the tests run them). `GET /metrics` renders `Metrics.render()`."""
from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RATE_WINDOW = 10.0  # seconds the tokens/s gauge averages over

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, slots_total: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("a3jax_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("a3jax_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("a3jax_generated_tokens", "tokens generated", registry=r)
        self.tokens_per_second = Gauge("a3jax_generated_tokens_per_second",
                                       f"tokens generated per second over the last {RATE_WINDOW:g} s", registry=r)
        self.finished = Counter("a3jax_sequences_finished", "sequences (one slot each) by finish reason",
                                ["reason"], registry=r)
        self.slots_busy = Gauge("a3jax_slots_busy", "slots decoding a request now", registry=r)
        self.slots_total = Gauge("a3jax_slots_total", "slots over all lanes", registry=r)
        self.queue = Gauge("a3jax_queue_length", "sequences and jobs waiting for a slot", registry=r)
        self.latency = Histogram("a3jax_request_latency_seconds", "request latency by endpoint", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("a3jax_time_to_first_token_seconds", "time to the first streamed token",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.slots_total.set(slots_total)
        self.tokens_per_second.set_function(self._rate)
        self._lock = threading.Lock()
        self._recent = collections.deque()  # (time, tokens)

    def generated(self, n: int) -> None:
        if n <= 0:
            return
        self.generated_tokens.inc(n)
        with self._lock:
            self._recent.append((time.monotonic(), n))

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW

    def render(self) -> bytes:
        return generate_latest(self.registry)

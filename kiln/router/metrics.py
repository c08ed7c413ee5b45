"""The router's Prometheus metrics (one registry per application, so tests can build many)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "RouterMetrics"]

_MAX_CACHED_APPS = 10_000
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RouterMetrics:
    def __init__(self, also: Sequence[CollectorRegistry] = ()) -> None:
        """`also`: registries of other parts running in this process (the scheduler's under
        `kiln dev`), rendered after the router's own."""
        self.registry = CollectorRegistry()
        self.also = tuple(also)
        self.requests = Counter(
            "kiln_router_requests",
            "HTTP requests handled, by route template and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.calls = Counter(
            "kiln_router_calls",
            "Calls finished, by function, kind (sync, stream, websocket), outcome (ok, "
            "cancelled, or the error code) and the caller's tier (operator for operator keys).",
            ["app", "function", "kind", "outcome", "tier"],
            registry=self.registry,
        )
        by_function = ["app", "function"]
        self.call_seconds = Histogram(
            "kiln_router_call_duration_seconds",
            "Time from request to reply for successful sync calls, by function.",
            by_function,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "kiln_router_queue_wait_seconds",
            "Time successful sync calls waited in the queue for a replica to take them (for "
            "capacity: a cold start, or a busy function), by function.",
            by_function,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.execution_seconds = Histogram(
            "kiln_router_call_execution_seconds",
            "Time from a replica taking a successful sync call to its reply, by function.",
            by_function,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.auth_rejected = Counter(
            "kiln_router_auth_rejections",
            "Requests refused before any call: missing, malformed (refused without a lookup) "
            "or unknown keys.",
            ["reason"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "kiln_router_rate_limited",
            "Requests refused with 429, by customer tier and the limit that refused them.",
            ["tier", "limit"],
            registry=self.registry,
        )
        self.rate_limit_fallback = Gauge(
            "kiln_router_rate_limit_fallback",
            "1 while Redis is unreachable and this router limits on its own (each limit "
            "divided by the number of routers it hears), else 0.",
            registry=self.registry,
        )
        self.customer_rejections = Counter(
            "kiln_router_customer_rejections",
            "Requests of known customers refused (401/403), rate-limited (429) or failed (5xx), "
            "by tier; per customer: GET /v1/abuse.",
            ["tier", "kind"],
            registry=self.registry,
        )
        self.voice_turn_seconds = Histogram(
            "kiln_voice_turn_seconds",
            "Real-time voice turns: time from the end of the user's speech to each stage "
            "(transcript, first_token, first_audio), by function.",
            ["app", "function", "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.voice_turns = Counter(
            "kiln_voice_turns",
            "Real-time voice answers finished, by function and how they ended (completed, "
            "cancelled, failed).",
            ["app", "function", "status"],
            registry=self.registry,
        )
        self.voice_barge_ins = Counter(
            "kiln_voice_barge_ins",
            "Real-time voice answers the user interrupted by speaking, by function.",
            by_function,
            registry=self.registry,
        )

        # `labels()` takes a lock and builds a tuple; the warm path reuses the children.
        self._requests_by: dict[tuple[str, int], Any] = {}
        self._calls_by: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self._counted_by: dict[tuple[str, str, str, str, str], Any] = {}

    def observe_voice_turn(
        self, app: str, function: str, status: str, stages: dict[str, float], barge_in: bool
    ) -> None:
        """One answer of a real-time voice session: its stages' latencies in seconds."""
        self.voice_turns.labels(app, function, status).inc()
        for stage, seconds in stages.items():
            self.voice_turn_seconds.labels(app, function, stage).observe(seconds)
        if barge_in:
            self.voice_barge_ins.labels(app, function).inc()

    def count_request(self, family: str, status: int) -> None:
        child = self._requests_by.get((family, status))
        if child is None:
            child = self._requests_by[(family, status)] = self.requests.labels(family, str(status))
        child.inc()

    def count_customer_rejection(self, tier: str, kind: str) -> None:
        self.customer_rejections.labels(tier, kind).inc()

    def count_rate_limited(self, tier: str, limit: str) -> None:
        self.rate_limited.labels(tier, limit).inc()

    def set_rate_limit_fallback(self, on: bool) -> None:
        self.rate_limit_fallback.set(1 if on else 0)

    def count_auth_rejection(self, reason: str) -> None:
        self.auth_rejected.labels(reason).inc()

    def count_call(self, app: str, function: str, kind: str, outcome: str, tier: str) -> None:
        key = (app, function, kind, outcome, tier)
        child = self._counted_by.get(key)
        if child is None:
            if len(self._counted_by) >= _MAX_CACHED_APPS:
                self._counted_by.clear()
            child = self._counted_by[key] = self.calls.labels(*key)
        child.inc()

    def observe_call(
        self, app: str, function: str, seconds: float, queue_wait_s: float, execution_s: float
    ) -> None:
        key = (app, function)
        children = self._calls_by.get(key)
        if children is None:
            if len(self._calls_by) >= _MAX_CACHED_APPS:
                self._calls_by.clear()
            children = (
                self.call_seconds.labels(app, function),
                self.queue_wait_seconds.labels(app, function),
                self.execution_seconds.labels(app, function),
            )
            self._calls_by[key] = children
        children[0].observe(seconds)
        children[1].observe(queue_wait_s)
        children[2].observe(execution_s)

    def render(self) -> bytes:
        return b"".join(generate_latest(r) for r in (self.registry, *self.also))

"""The scheduler's metrics: what each function wants and has, what waits, what the scheduler
decided, and whether this scheduler is the one acting. Labels are bounded: functions by app and
name (gone functions are removed), directions, GPU request strings, never replica ids."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["SchedulingMetrics"]


class SchedulingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        by_function = ["app", "function"]
        self.desired = Gauge(
            "kiln_scheduler_desired_replicas",
            "Replicas each function should have: clamp(ceil((pending + running) / "
            "target_concurrency) + buffer, min, max).",
            by_function,
            registry=registry,
        )
        self.actual = Gauge(
            "kiln_scheduler_replicas",
            "Replicas each function has of its current version, starting or ready.",
            by_function,
            registry=registry,
        )
        self.pending = Gauge(
            "kiln_scheduler_pending_calls",
            "Calls in each function's queue that no replica has finished (pending + unacked).",
            by_function,
            registry=registry,
        )
        self.decisions = Counter(
            "kiln_scheduler_scale_decisions",
            "Replicas the scheduler started (up) or drained for idleness (down).",
            ["direction"],
            registry=registry,
        )
        self.placement_failures = Counter(
            "kiln_scheduler_placement_failures",
            "Replicas wanted that no node could take at the time (the demand waits), by GPU "
            "request.",
            ["gpu"],
            registry=registry,
        )
        self.leading = Gauge(
            "kiln_scheduler_leading",
            "1 while this scheduler process is the one acting, 0 while it stands by.",
            registry=registry,
        )
        self._functions: set[tuple[str, str]] = set()

    def function(self, app: str, name: str, *, desired: int, actual: int, pending: int) -> None:
        self._functions.add((app, name))
        self.desired.labels(app, name).set(desired)
        self.actual.labels(app, name).set(actual)
        self.pending.labels(app, name).set(pending)

    def keep_only(self, functions: set[tuple[str, str]]) -> None:
        """Forget the series of functions that are gone (deleted apps, removed functions)."""
        for gone in self._functions - functions:
            for gauge in (self.desired, self.actual, self.pending):
                gauge.remove(*gone)
        self._functions &= functions

"""The scheduler's metrics: what each function wants and has, what waits, what the scheduler
decided, and whether this scheduler is the one acting. Labels are bounded: functions by app and
name (gone functions are removed), directions, GPU request strings, replica and node states,
never replica or node ids. Cluster-wide gauges (replicas and nodes by state, the oldest queued
job) are set by the acting scheduler only and zeroed on standbys, so a sum over schedulers
counts each once."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge

from kiln.db.enums import LIVE_REPLICA_STATES, NodeState, ReplicaState

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
        self.replicas_by_state = Gauge(
            "kiln_scheduler_replicas_by_state",
            "Live replicas of all functions by state (starting, restoring, ready, draining), "
            "as the acting scheduler tracks them.",
            ["state"],
            registry=registry,
        )
        self.oldest_queued_job = Gauge(
            "kiln_jobs_oldest_queued_seconds",
            "Age of the oldest async job still queued (0 when none), refreshed by the acting "
            "scheduler every few seconds.",
            registry=registry,
        )
        self.nodes = Gauge(
            "kiln_scheduler_nodes",
            "Node agents the acting scheduler has heard from since it started, by state (ready: "
            "heartbeating; lost: silent for longer than the heartbeat allows).",
            ["state"],
            registry=registry,
        )
        self.nodes_lost = Counter(
            "kiln_scheduler_nodes_lost",
            "Times a node agent fell silent and was recorded as lost.",
            registry=registry,
        )
        self._functions: set[tuple[str, str]] = set()
        self.replica_states(())
        self.node_states(ready=0, lost=0)

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

    def replica_states(self, states: Iterable[ReplicaState]) -> None:
        """Count `states` (one per tracked replica); every live state gets a value, 0 too."""
        # The states of the replicas the scheduler tracks; it forgets the ended ones.
        counts = dict.fromkeys(LIVE_REPLICA_STATES, 0)
        for state in states:
            if state in counts:
                counts[state] += 1
        for state, count in counts.items():
            self.replicas_by_state.labels(state.value).set(count)

    def node_states(self, *, ready: int, lost: int) -> None:
        self.nodes.labels(NodeState.READY.value).set(ready)
        self.nodes.labels(NodeState.LOST.value).set(lost)

    def standing_by(self) -> None:
        """This scheduler stopped acting: the acting one reports the cluster-wide gauges."""
        self.replica_states(())
        self.node_states(ready=0, lost=0)
        self.oldest_queued_job.set(0)

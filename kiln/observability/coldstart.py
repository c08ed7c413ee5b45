"""Cold-start metrics, recorded by the scheduler from the replicas' reports: each phase's
duration, how each replica's instance was built and in what process (a standby that had imported
what the function needs, one that had not, a fresh one), and snapshot fallbacks."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["PHASES", "ColdStartMetrics"]

# Every phase a report may carry; anything else is dropped, so the label set stays bounded.
PHASES = (
    "schedule",  # demand seen by the scheduler -> a node agent took the order
    "assign",  # the agent's order -> the replica process running (a standby, or a fresh one)
    "code_load",  # fetch, unpack and import the function's code
    "restore",  # snapshot bytes into memory (or GPU memory); its steps follow
    "restore_graph_read",  # graph.pkl off the disk
    "restore_cpu_pages",  # the CPU blob mapped, its pages faulted in (or read privately)
    "restore_gpu_alloc",  # device allocations, one per CUDA storage
    "restore_gpu_copy",  # the CUDA blob through the pinned staging ring
    "restore_unpickle",  # the object graph rebuilt around the storages
    "restore_gpu_sync",  # the last copies landing
    "snap_hooks",  # @enter(snap=True) hooks, when no snapshot served
    "bake",  # writing the snapshot after those hooks
    "enter",  # the plain @enter() hooks
    "first_call",  # the first call's run time
    "total",  # demand seen -> ready
)
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class ColdStartMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.phase_seconds = Histogram(
            "kiln_cold_start_phase_seconds",
            "Duration of each phase of replica cold starts.",
            ["phase"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.cold_starts = Counter(
            "kiln_cold_starts",
            "Replicas that became ready, by how their instance was built (origin: snapshot, "
            "baked, hooks, fallback) and the process they started in (process: standby, one "
            "that had imported what the function needs; partial, a standby that had not; "
            "fresh, none was ready).",
            ["origin", "process"],
            registry=self.registry,
        )
        self.snapshot_fallbacks = Counter(
            "kiln_snapshot_fallbacks",
            "Cold starts whose snapshot failed verification or restore and ran the setup hooks.",
            registry=self.registry,
        )

    def observe(self, phases: dict[str, float], origin: str | None, process: str = "fresh") -> None:
        for phase, seconds in phases.items():
            if phase in PHASES and seconds >= 0:
                self.phase_seconds.labels(phase).observe(seconds)
        if origin is not None:
            self.cold_starts.labels(origin, process).inc()
            if origin == "fallback":
                self.snapshot_fallbacks.inc()

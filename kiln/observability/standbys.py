"""A node agent's standby pool metrics: how many standbys are ready or starting and the memory
they hold, how many flavours (import sets) the node keeps, what each cold start got, and the
standbys the plan wanted but memory or failures kept from starting. No labels name a flavour or
a function: flavours come and go with deploys."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["StandbyMetrics"]


class StandbyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.standbys = Gauge(
            "kiln_standby_processes",
            "Standby processes on this node, by state (ready, starting).",
            ["state"],
            registry=registry,
        )
        self.memory = Gauge(
            "kiln_standby_memory_bytes",
            "Resident memory of this node's ready standby processes together.",
            registry=registry,
        )
        self.flavours = Gauge(
            "kiln_standby_flavours",
            "Distinct standby flavours (import sets) this node keeps.",
            registry=registry,
        )
        self.takes = Counter(
            "kiln_standby_takes",
            "Cold starts by the standby they got: covering (one that had imported what the "
            "function needs), generic, other (another flavour's, on a GPU), none (a fresh "
            "process).",
            ["fit"],
            registry=registry,
        )
        self.skipped = Counter(
            "kiln_standby_skipped",
            "Standbys the plan wanted but the pool did not start, by reason (memory, failing).",
            ["reason"],
            registry=registry,
        )

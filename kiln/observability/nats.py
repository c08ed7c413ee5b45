"""Metrics of a process's NATS connections: whether each is up, and how often it came back.

`NatsMetrics.callbacks(process)` gives the `disconnected_cb`/`reconnected_cb` keywords for
`nats.connect(...)`. nats-py calls neither for the first connection: the gauge starts at 0
while it connects (a service serves its metrics and health meanwhile), and `up(process)`
(kiln._nats.NatsLink calls it) sets it to 1 once connected.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from typing import TypedDict

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["NatsCallbacks", "NatsMetrics", "NatsProcess"]

Callback = Callable[[], Awaitable[None]]


class NatsProcess(enum.StrEnum):
    """Which part of the platform holds the connection (the `process` label)."""

    ROUTER = "router"
    SCHEDULER = "scheduler"
    NODE_AGENT = "node_agent"
    BILLING = "billing"
    PLATFORM = "platform"  # `kiln dev`: scheduler, node agent, job recorder and billing


class NatsCallbacks(TypedDict):
    disconnected_cb: Callback
    reconnected_cb: Callback


class NatsMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.reconnects = Counter(
            "kiln_nats_reconnects",
            "Times a NATS connection came back after it was lost, by process.",
            ["process"],
            registry=self.registry,
        )
        self.connected = Gauge(
            "kiln_nats_connected",
            "1 while the process's NATS connection is up, 0 while it is lost or closed.",
            ["process"],
            registry=self.registry,
        )

    def callbacks(
        self,
        process: NatsProcess,
        *,
        reconnected: Callback | None = None,
        disconnected: Callback | None = None,
    ) -> NatsCallbacks:
        """Keywords for `nats.connect(...)` that keep this process's series current; the
        connection's own `reconnected`/`disconnected` callbacks, if any, run after them."""
        # Both series exist from here on (the counter at 0), so rate() sees the first reconnect.
        reconnects = self.reconnects.labels(process.value)
        connected = self.connected.labels(process.value)
        connected.set(0)  # connecting

        async def on_disconnected() -> None:
            connected.set(0)
            if disconnected is not None:
                await disconnected()

        async def on_reconnected() -> None:
            reconnects.inc()
            connected.set(1)
            if reconnected is not None:
                await reconnected()

        return NatsCallbacks(disconnected_cb=on_disconnected, reconnected_cb=on_reconnected)

    def up(self, process: NatsProcess) -> None:
        """The first connection of `process` succeeded."""
        self.connected.labels(process.value).set(1)

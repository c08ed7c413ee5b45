"""The node agent on its own, as production runs it on every GPU host (`python -m
kiln.invoker`): the host's slots, replica processes, standby pool, snapshot cache and GPU
telemetry, with Prometheus metrics on `KILN_METRICS_PORT`. It needs NATS only: no database,
no Stripe, so a GPU host holds no platform secrets beyond the snapshot signing key.

SIGTERM or SIGINT stops it: its replicas drain (finishing the calls they hold, then signalled
if they overstay), their final usage is reported, then NATS closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats

from kiln._service import run_service
from kiln.invoker.agent import NodeAgent
from kiln.observability.exposition import serve_metrics
from kiln.observability.nats import NatsMetrics, NatsProcess
from kiln.settings import Settings

__all__ = ["main", "serve_node_agent"]

_log = logging.getLogger("kiln.agent")


async def serve_node_agent(settings: Settings, stop: asyncio.Event) -> None:
    nats_metrics = NatsMetrics()
    async with contextlib.AsyncExitStack() as exits:
        nc = await nats.connect(
            servers=settings.nats_servers,
            connect_timeout=settings.connect_timeout_s,
            name="kiln-node-agent",
            max_reconnect_attempts=-1,  # a service waits for NATS to come back, however long
            **nats_metrics.callbacks(NatsProcess.NODE_AGENT),
        )
        exits.push_async_callback(nc.drain)
        agent = NodeAgent(settings, nc)
        await exits.enter_async_context(
            serve_metrics(
                [agent.metrics_registry, nats_metrics.registry],
                host=settings.host,
                port=settings.metrics_port,
            )
        )
        _log.info("node agent %s running (slots %s)", agent.node_id, agent.slots.total)
        await agent.run(stop)
    _log.info("node agent stopped")


def main() -> None:
    run_service(serve_node_agent)

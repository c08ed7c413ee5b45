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

from kiln._service import open_health, open_metrics, open_nats, run_service
from kiln.invoker.agent import NodeAgent
from kiln.observability.nats import NatsMetrics, NatsProcess
from kiln.settings import Settings

__all__ = ["main", "serve_node_agent"]

_log = logging.getLogger("kiln.agent")


async def serve_node_agent(settings: Settings, stop: asyncio.Event) -> None:
    nats_metrics = NatsMetrics()
    async with contextlib.AsyncExitStack() as exits:
        health = await open_health(exits, settings)
        # Health and metrics first: they answer (and say why) while NATS is awaited; the
        # agent's own metrics join once it exists.
        registries = [nats_metrics.registry]
        await open_metrics(exits, settings, registries, health=health)
        link = await open_nats(
            exits, settings, NatsProcess.NODE_AGENT, nats_metrics, health=health, stop=stop
        )
        agent = NodeAgent(settings, link.client)
        link.on_reconnected(agent.on_nats_reconnected)
        registries.append(agent.metrics_registry)
        _log.info("node agent %s running (slots %s)", agent.node_id, agent.slots.total)
        await agent.run(stop)
    _log.info("node agent stopped")


def main() -> None:
    run_service(serve_node_agent)

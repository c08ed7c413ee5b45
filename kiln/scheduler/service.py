"""The scheduler on its own, as production runs it (`python -m kiln.scheduler`): the reconcile
loop with leader election, so two or more copies may run and one acts
(`KILN_SCHEDULER_LEASE_S`), with Prometheus metrics on `KILN_METRICS_PORT`.

SIGTERM or SIGINT stops it: the loop ends its pass, the lease is given up (a standby takes over
at its next try), then NATS and the database close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats

from kiln._service import run_service
from kiln.db.session import create_engine, session_factory
from kiln.observability.coldstart import ColdStartMetrics
from kiln.observability.exposition import serve_metrics
from kiln.observability.nats import NatsMetrics, NatsProcess
from kiln.scheduler.scheduler import Scheduler
from kiln.settings import Settings

__all__ = ["main", "serve_scheduler"]

_log = logging.getLogger("kiln.scheduler")


async def serve_scheduler(settings: Settings, stop: asyncio.Event) -> None:
    nats_metrics = NatsMetrics()
    # The scheduler's own metrics (replicas, decisions, leadership) share this registry.
    cold_starts = ColdStartMetrics()
    async with contextlib.AsyncExitStack() as exits:
        engine = create_engine(settings, application_name="kiln-scheduler")
        exits.push_async_callback(engine.dispose)
        nc = await nats.connect(
            servers=settings.nats_servers,
            connect_timeout=settings.connect_timeout_s,
            name="kiln-scheduler",
            max_reconnect_attempts=-1,  # a service waits for NATS to come back, however long
            **nats_metrics.callbacks(NatsProcess.SCHEDULER),
        )
        exits.push_async_callback(nc.drain)
        await exits.enter_async_context(
            serve_metrics(
                [cold_starts.registry, nats_metrics.registry],
                host=settings.host,
                port=settings.metrics_port,
            )
        )
        scheduler = Scheduler(
            nc,
            session_factory(engine),
            settings.namespace,
            cold_starts,
            lease_s=settings.scheduler_lease_s,
        )
        _log.info("scheduler running (lease %g s)", settings.scheduler_lease_s)
        await scheduler.run(stop)
    _log.info("scheduler stopped")


def main() -> None:
    run_service(serve_scheduler)

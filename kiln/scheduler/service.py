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

from kiln._service import open_database, open_health, open_metrics, open_nats, run_service
from kiln.blobs import parks_volumes
from kiln.db.session import session_factory
from kiln.observability.coldstart import ColdStartMetrics
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
        health = await open_health(exits, settings)
        engine = open_database(exits, settings, application_name="kiln-scheduler")
        # Health and metrics first: they answer (and say why) while NATS is awaited.
        await open_metrics(
            exits, settings, [cold_starts.registry, nats_metrics.registry], health=health
        )
        link = await open_nats(
            exits, settings, NatsProcess.SCHEDULER, nats_metrics, health=health, stop=stop
        )
        nc = link.client
        scheduler = Scheduler(
            nc,
            session_factory(engine),
            settings.namespace,
            cold_starts,
            lease_s=settings.scheduler_lease_s,
            signing_key=settings.snapshot_signing_key,
            stream_replicas=settings.stream_replicas,
            parks_volumes=parks_volumes(settings),
        )
        _log.info("scheduler running (lease %g s)", settings.scheduler_lease_s)
        await scheduler.run(stop)
    _log.info("scheduler stopped")


def main() -> None:
    run_service(serve_scheduler)

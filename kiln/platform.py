"""The whole platform in one process, as `kiln dev` and the end-to-end tests run it: the router
(uvicorn), the scheduler, the job recorder, billing and one node agent sharing an event loop,
NATS connection and database pool. Replicas are child processes of the node agent.

Everything is opened on one `AsyncExitStack`, so shutdown runs it backwards, each step bounded:
the router stops taking requests and lets calls in flight finish; the node agent drains its
replicas; the scheduler records their exits; the job recorder and billing write down their last
jobs and usage; then NATS and the database close.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry

from kiln._service import (
    StoppedBeforeReady,
    open_database,
    open_health,
    open_nats,
    push_bounded,
    start_part,
)
from kiln.billing.invoice_worker import invoice_worker
from kiln.billing.ledger import billing_rules
from kiln.billing.outbox import OutboxWorker
from kiln.billing.stripe_gateway import StripeGateway
from kiln.billing.worker import BillingWorker
from kiln.blobs import parks_volumes
from kiln.db.session import session_factory
from kiln.devstack.ports import is_free
from kiln.errors import DevStackError
from kiln.invoker.agent import NodeAgent
from kiln.jobs.recorder import JobRecorder
from kiln.observability.billing import BillingMetrics
from kiln.observability.coldstart import ColdStartMetrics
from kiln.observability.nats import NatsMetrics, NatsProcess
from kiln.router.app import create_app
from kiln.router.server import open_router
from kiln.scheduler.scheduler import Scheduler
from kiln.settings import Settings

__all__ = ["serve_platform"]

# What a part may take beyond the drain itself to return once told to stop.
_PART_MARGIN_S = 10.0


async def serve_platform(
    settings: Settings,
    stop: asyncio.Event,
    *,
    on_ready: Callable[[], None] | None = None,
    scheduler: bool = True,
    billing: bool = True,
    registries: Sequence[CollectorRegistry] = (),
) -> None:
    """The router, a scheduler and a node agent in this process until `stop`. `scheduler=False`
    leaves the scheduler out, for tests that run their own (several, electing a leader);
    `billing=False` the billing and outbox workers, for tests that run the billing service as
    a process of its own (`python -m kiln.billing`). `registries`: more metrics for the
    router's /metrics (`kiln dev`'s supervisor of its embedded servers)."""
    if not is_free(settings.port, settings.host):
        raise DevStackError(
            f"port {settings.port} on {settings.host} is taken; stop what uses it or choose "
            "another with --port or KILN_PORT"
        )
    within_s = settings.shutdown_timeout_s + _PART_MARGIN_S
    async with contextlib.AsyncExitStack() as exits:
        health = await open_health(exits, settings)
        health.readiness.append(lambda: "stopping" if stop.is_set() else None)
        engine = open_database(exits, settings, application_name="kiln-platform")
        sessions = session_factory(engine)
        # One registry for this process's NATS connections (the router's and this one), so
        # /metrics shows each family once.
        nats_metrics = NatsMetrics()
        try:
            link = await open_nats(
                exits, settings, NatsProcess.PLATFORM, nats_metrics, health=health,
                name="kiln-platform", stop=stop,
            )  # fmt: skip
        except StoppedBeforeReady:
            return
        nc = link.client
        cold_starts = ColdStartMetrics()
        billing_metrics = BillingMetrics()
        rules = billing_rules(settings)

        # Started in the reverse of the order they stop in.
        parts = [
            start_part(
                exits, JobRecorder(nc, sessions, settings).run, "kiln-job-recorder",
                within_s=within_s,
            )
        ]  # fmt: skip
        if billing:
            worker = BillingWorker(
                nc, sessions, settings.namespace, rules, billing_metrics,
                usage_secret=settings.snapshot_signing_key,
                stream_replicas=settings.stream_replicas,
            )  # fmt: skip
            parts.append(start_part(exits, worker.run, "kiln-billing", within_s=within_s))
            invoicing = invoice_worker(settings, nc, sessions, rules, billing_metrics)
            parts.append(start_part(exits, invoicing.run, "kiln-invoices", within_s=within_s))
        if billing and settings.stripe_enabled:
            gateway = StripeGateway(settings)
            push_bounded(exits, gateway.close, "the Stripe client")
            outbox = OutboxWorker(
                nc, sessions, gateway, rules, settings.namespace, billing_metrics,
                signing_key=settings.snapshot_signing_key,
            )  # fmt: skip
            parts.append(start_part(exits, outbox.run, "kiln-outbox", within_s=within_s))
        if scheduler:
            acting = Scheduler(
                nc, sessions, settings.namespace, cold_starts,
                lease_s=settings.scheduler_lease_s, signing_key=settings.snapshot_signing_key,
                stream_replicas=settings.stream_replicas, parks_volumes=parks_volumes(settings),
            )  # fmt: skip
            parts.append(start_part(exits, acting.run, "kiln-scheduler", within_s=within_s))
        node_agent = NodeAgent(settings, nc, shares_host=True)
        link.on_reconnected(node_agent.on_nats_reconnected)
        parts.append(start_part(exits, node_agent.run, "kiln-node-agent", within_s=within_s))
        also = [
            cold_starts.registry, billing_metrics.registry, node_agent.metrics_registry,
            *registries,
        ]  # fmt: skip
        app = create_app(settings, metrics_also=also, nats_metrics=nats_metrics, health=health)
        router = await open_router(exits, settings, app)
        assert router.task is not None
        parts.append(router.task)

        if on_ready is not None:
            on_ready()
        stopped = asyncio.create_task(stop.wait(), name="kiln-platform-stop")
        exits.callback(stopped.cancel)
        done, _ = await asyncio.wait([*parts, stopped], return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        ended = [part for part in done if part is not stopped]
    # A part that ended by itself (a bug, a lost dependency it could not outlive) ends the
    # platform, and says why.
    for part in ended:
        if not part.cancelled() and part.exception() is not None:
            raise part.exception()  # type: ignore[misc]

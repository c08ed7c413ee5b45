"""The whole platform in one process, as `kiln dev` and the end-to-end tests run it: the router
(uvicorn), the scheduler, the job recorder and one node agent sharing an event loop, NATS
connection and database pool. Replicas are child processes of the node agent.

Shutdown is phased and bounded: the router stops taking requests and lets calls in flight
finish, the node agent drains its replicas, the scheduler stops, then NATS and the database are
closed in reverse order of opening.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Generator

import nats
import uvicorn

from kiln._nats import connect_options
from kiln.billing.ledger import billing_rules
from kiln.billing.outbox import OutboxWorker
from kiln.billing.stripe_gateway import StripeGateway
from kiln.billing.worker import BillingWorker
from kiln.db.session import create_engine, session_factory
from kiln.devstack.ports import is_free
from kiln.errors import DevStackError
from kiln.invoker.agent import NodeAgent
from kiln.jobs.recorder import JobRecorder
from kiln.observability.billing import BillingMetrics
from kiln.observability.coldstart import ColdStartMetrics
from kiln.observability.nats import NatsMetrics, NatsProcess
from kiln.router.app import create_app
from kiln.scheduler.scheduler import Scheduler
from kiln.settings import Settings

__all__ = ["serve_platform"]


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the platform owns signals and shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def serve_platform(
    settings: Settings,
    stop: asyncio.Event,
    *,
    on_ready: Callable[[], None] | None = None,
    scheduler: bool = True,
    billing: bool = True,
) -> None:
    """The router, a scheduler and a node agent in this process until `stop`. `scheduler=False`
    leaves the scheduler out, for tests that run their own (several, electing a leader);
    `billing=False` the billing and outbox workers, for tests that run the billing service as
    a process of its own (`python -m kiln.billing`)."""
    if not is_free(settings.port, settings.host):
        raise DevStackError(
            f"port {settings.port} on {settings.host} is taken; stop what uses it or choose "
            "another with --port or KILN_PORT"
        )
    async with contextlib.AsyncExitStack() as exits:
        engine = create_engine(settings, application_name="kiln-platform")
        exits.push_async_callback(engine.dispose)
        # One registry for this process's NATS connections (the router's and this one), so
        # /metrics shows each family once.
        nats_metrics = NatsMetrics()
        nc = await nats.connect(
            **connect_options(settings, name="kiln-platform"),
            **nats_metrics.callbacks(NatsProcess.PLATFORM),
        )
        exits.push_async_callback(nc.drain)

        cold_starts = ColdStartMetrics()
        billing_metrics = BillingMetrics()
        node_agent = NodeAgent(settings, nc)
        also = [cold_starts.registry, billing_metrics.registry, node_agent.metrics_registry]
        server = _Server(
            uvicorn.Config(
                create_app(settings, metrics_also=also, nats_metrics=nats_metrics),
                host=settings.host,
                port=settings.port,
                log_level="warning",
                lifespan="on",
                timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
            )
        )
        router = asyncio.create_task(server.serve(), name="kiln-router")
        while not server.started:
            if router.done():
                await router  # raises what went wrong
                raise DevStackError("the router stopped while starting")
            await asyncio.sleep(0.02)

        # The scheduler stops last, so it still records the exits of the replicas the node
        # agent drains on the way out.
        scheduler_stop = asyncio.Event()
        schedule = (
            Scheduler(
                nc, session_factory(engine), settings.namespace, cold_starts,
                lease_s=settings.scheduler_lease_s, signing_key=settings.snapshot_signing_key,
            ).run(scheduler_stop)
            if scheduler
            else scheduler_stop.wait()
        )  # fmt: skip
        scheduling = asyncio.create_task(schedule, name="kiln-scheduler")
        agent = asyncio.create_task(node_agent.run(stop), name="kiln-node-agent")
        recorder_stop = asyncio.Event()
        recording = asyncio.create_task(
            JobRecorder(nc, session_factory(engine), settings).run(recorder_stop),
            name="kiln-job-recorder",
        )
        rules = billing_rules(settings)
        parts = [router, scheduling, agent, recording]
        if billing:
            worker = BillingWorker(
                nc, session_factory(engine), settings.namespace, rules, billing_metrics,
                usage_secret=settings.snapshot_signing_key,
            )  # fmt: skip
            parts.append(asyncio.create_task(worker.run(recorder_stop), name="kiln-billing"))
        if billing and settings.stripe_enabled:
            gateway = StripeGateway(settings)
            exits.push_async_callback(gateway.close)
            outbox = OutboxWorker(
                nc, session_factory(engine), gateway, rules, settings.namespace, billing_metrics,
                signing_key=settings.snapshot_signing_key,
            )  # fmt: skip
            parts.append(asyncio.create_task(outbox.run(recorder_stop), name="kiln-outbox"))
        if on_ready is not None:
            on_ready()
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([*parts, stopped], return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        server.should_exit = True
        deadline = settings.shutdown_timeout_s + 30
        first = await asyncio.wait_for(
            asyncio.gather(router, agent, return_exceptions=True), timeout=deadline
        )
        await asyncio.sleep(0.2)  # the last exit events are on their way
        scheduler_stop.set()
        # After the replicas: the recorder and billing write down their last jobs and usage.
        recorder_stop.set()
        results = [
            *first,
            *await asyncio.gather(scheduling, *parts[3:], return_exceptions=True),
        ]
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures and stopped not in done:
            raise failures[0]

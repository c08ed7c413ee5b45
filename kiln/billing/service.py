"""The billing service on its own, as production runs it beside the routers (`python -m
kiln.billing`): the billing worker (usage → ledger), the invoice worker (periods closed into
invoices, mailed, overdue ones blocking) and, with Stripe set up, the outbox worker
(ledger → Stripe), with Prometheus metrics on `KILN_METRICS_PORT`. Any number of copies may run:
they share the usage stream's consumer and claim outbox rows with SKIP LOCKED.

SIGTERM or SIGINT stops it: the workers finish the batch in hand, then NATS and the database
close. A kill at any moment loses nothing: usage is acked only after its transaction commits,
and an outbox row is marked sent in the transaction that sent it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from kiln._service import (
    open_database,
    open_health,
    open_metrics,
    open_nats,
    push_bounded,
    run_service,
)
from kiln.billing.invoice_worker import invoice_worker
from kiln.billing.ledger import billing_rules
from kiln.billing.outbox import OutboxWorker
from kiln.billing.stripe_gateway import StripeGateway
from kiln.billing.worker import BillingWorker
from kiln.db.session import session_factory
from kiln.observability.billing import BillingMetrics
from kiln.observability.nats import NatsMetrics, NatsProcess
from kiln.settings import Settings

__all__ = ["main", "serve_billing"]

_log = logging.getLogger("kiln.billing")


async def serve_billing(settings: Settings, stop: asyncio.Event) -> None:
    metrics = BillingMetrics()
    nats_metrics = NatsMetrics()
    rules = billing_rules(settings)
    async with contextlib.AsyncExitStack() as exits:
        health = await open_health(exits, settings)
        engine = open_database(exits, settings, application_name="kiln-billing")
        # Health and metrics first: they answer (and say why) while NATS is awaited.
        await open_metrics(
            exits, settings, [metrics.registry, nats_metrics.registry], health=health
        )
        link = await open_nats(
            exits, settings, NatsProcess.BILLING, nats_metrics, health=health, stop=stop
        )
        nc = link.client
        sessions = session_factory(engine)
        workers = [
            BillingWorker(
                nc, sessions, settings.namespace, rules, metrics,
                usage_secret=settings.snapshot_signing_key,
                stream_replicas=settings.stream_replicas,
            ).run(stop),
            invoice_worker(settings, nc, sessions, rules, metrics).run(stop),
        ]  # fmt: skip
        if settings.stripe_enabled:
            gateway = StripeGateway(settings)
            push_bounded(exits, gateway.close, "the Stripe client")
            outbox = OutboxWorker(
                nc, sessions, gateway, rules, settings.namespace, metrics,
                signing_key=settings.snapshot_signing_key,
            )  # fmt: skip
            workers.append(outbox.run(stop))
        _log.info("billing service running (Stripe: %s)", settings.stripe_enabled)
        await asyncio.gather(*workers)


def main() -> None:
    run_service(serve_billing)

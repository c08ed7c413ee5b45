"""The Stripe outbox worker: sends what the ledger queued for Stripe (meter events, refill
charges, invoices and the attempts to collect them) until Stripe acknowledges each, and acts on
the answers.

Rows are claimed with `FOR UPDATE SKIP LOCKED`, so several workers never send one row at the
same time; a row is marked sent in the transaction that claimed it. A crash between Stripe's
answer and that commit sends the row again, under the same identifier and idempotency key:
Stripe answers the repeat without acting twice. Failures back off (1 s doubling to 10 min) and
never stop: the age of the oldest unsent row is a metric to alert on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
import stripe
from nats.aio.client import Client as NATS
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kiln.billing.invoices import invoice_name, payment_failed, queue_collection, record_payment
from kiln.billing.ledger import BillingRules, Changes, credit_payment, fail_payment
from kiln.billing.prices import split_minor
from kiln.billing.stripe_gateway import StripeGateway
from kiln.billing.worker import announce_blocks
from kiln.db.enums import InvoiceStatus, OutboxKind
from kiln.db.models import Customer, Invoice, InvoiceLine, Payment, StripeOutbox
from kiln.db.session import transaction
from kiln.observability.billing import BillingMetrics
from kiln.seal import Seals
from kiln.wire import Subjects

__all__ = ["OutboxWorker", "ensure_stripe_customer"]

_log = logging.getLogger("kiln.billing.outbox")
_BATCH = 50
_IDLE_S = 1.0
_MAX_BACKOFF_S = 600.0


async def ensure_stripe_customer(
    session: AsyncSession, gateway: StripeGateway, customer_id: uuid.UUID
) -> str:
    """The customer's Stripe id, created (idempotently) the first time it is needed."""
    customer = await session.get(Customer, customer_id)
    assert customer is not None
    if customer.stripe_customer_id is None:
        customer.stripe_customer_id = await gateway.ensure_customer(str(customer.id), customer.name)
        await session.flush()
    return customer.stripe_customer_id


class OutboxWorker:
    def __init__(
        self,
        nc: NATS,
        sessions: async_sessionmaker[AsyncSession],
        gateway: StripeGateway,
        rules: BillingRules,
        namespace: str,
        metrics: BillingMetrics | None = None,
        *,
        signing_key: str | None = None,
    ) -> None:
        """`signing_key`: the platform's, which seals the billing blocks it announces."""
        self.seals = Seals(signing_key)
        self.nc = nc
        self.sessions = sessions
        self.gateway = gateway
        self.rules = rules
        self.subjects = Subjects(namespace)
        self.metrics = metrics or BillingMetrics()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                sent = await self.send_due()
                await self._measure()
            except Exception:  # noqa: BLE001 - the database is away: try again shortly
                _log.exception("the Stripe outbox could not be read")
                sent = 0
            if sent < _BATCH:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), _IDLE_S)

    async def send_due(self) -> int:
        """Send the rows that are due; how many Stripe acknowledged."""
        changes = Changes()
        sent = 0
        async with transaction(self.sessions) as session:
            rows = (
                await session.scalars(
                    sa.select(StripeOutbox)
                    .where(
                        StripeOutbox.sent_at.is_(None),
                        StripeOutbox.next_attempt_at <= sa.func.now(),
                    )
                    .order_by(StripeOutbox.next_attempt_at)
                    .limit(_BATCH)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            for row in rows:
                if await self._send(session, row, changes):
                    sent += 1
        await announce_blocks(self.nc, self.subjects, changes, seals=self.seals)
        return sent

    async def _send(self, session: AsyncSession, row: StripeOutbox, changes: Changes) -> bool:
        try:
            async with session.begin_nested():
                stripe_customer = await ensure_stripe_customer(
                    session, self.gateway, row.customer_id
                )
                if row.kind is OutboxKind.METER_EVENT:
                    await self.gateway.meter_event(
                        row.identifier,
                        stripe_customer,
                        int(row.payload["value"]),
                        int(row.payload["timestamp"]),
                    )
                elif row.kind is OutboxKind.INVOICE:
                    await self._issue(session, row, stripe_customer)
                elif row.kind is OutboxKind.INVOICE_PAYMENT:
                    await self._collect(session, row, changes)
                else:
                    await self._refill(session, row, stripe_customer, changes)
        except (stripe.StripeError, OSError) as exc:
            row.attempts += 1
            delay = min(_MAX_BACKOFF_S, 2.0 ** min(row.attempts - 1, 20))
            row.next_attempt_at = datetime.now(UTC) + timedelta(seconds=delay)
            row.error = f"{type(exc).__name__}: {exc}"[:2000]
            self.metrics.outbox_failures.labels(row.kind.value).inc()
            _log.warning("Stripe %s %s failed (attempt %d): %s", row.kind.value, row.identifier,
                         row.attempts, exc)  # fmt: skip
            return False
        row.sent_at = datetime.now(UTC)
        row.attempts += 1
        row.error = None
        self.metrics.outbox_sent.labels(row.kind.value).inc()
        return True

    async def _refill(
        self, session: AsyncSession, row: StripeOutbox, stripe_customer: str, changes: Changes
    ) -> None:
        payment = await session.get(Payment, row.identifier)
        customer = await session.get(Customer, row.customer_id)
        assert payment is not None
        assert customer is not None
        if customer.payment_method_id is None:
            await fail_payment(session, payment.id, "no saved payment method", self.rules, changes)
            return
        charge = await self.gateway.payment_intent(
            payment.id, stripe_customer, payment.amount_micros,
            payment_method=customer.payment_method_id,
        )  # fmt: skip
        if charge.id:
            payment.payment_intent_id = charge.id
        if charge.status == "succeeded":
            await credit_payment(session, payment.id, self.rules, changes)
        elif charge.error is not None or charge.status in ("requires_payment_method", "canceled"):
            await fail_payment(session, payment.id, charge.error or charge.status, self.rules,
                               changes)  # fmt: skip
        # Otherwise (processing, requires_action) Stripe's webhook settles it.

    async def _issue(self, session: AsyncSession, row: StripeOutbox, stripe_customer: str) -> None:
        """Issue the invoice in Stripe, then ask for its first payment."""
        invoice = await session.get(
            Invoice, uuid.UUID(row.payload["invoice_id"]), with_for_update=True
        )
        if invoice is None or invoice.status is not InvoiceStatus.OPEN:
            return  # paid meanwhile (an operator recorded it): nothing to collect
        if invoice.stripe_invoice_id is None:
            lines = list(
                await session.scalars(
                    sa.select(InvoiceLine)
                    .where(InvoiceLine.invoice_id == invoice.id)
                    .order_by(InvoiceLine.position)
                )
            )
            cents = split_minor([line.amount_micros for line in lines], invoice.currency)
            items = [(line.description, amount) for line, amount in zip(lines, cents, strict=True)]
            issued = await self.gateway.issue_invoice(
                str(invoice.id), stripe_customer,
                title=f"Kiln invoice {invoice_name(invoice)} for {invoice.period}", lines=items,
            )  # fmt: skip
            invoice.stripe_invoice_id = issued.id
            invoice.payment_url = issued.payment_url
            await session.flush()
        await queue_collection(session, invoice, attempt=1, at=datetime.now(UTC))

    async def _collect(self, session: AsyncSession, row: StripeOutbox, changes: Changes) -> None:
        """One attempt to collect an open invoice; a failure schedules the next. Or, for an
        invoice paid outside Stripe, telling Stripe so."""
        invoice = await session.get(
            Invoice, uuid.UUID(row.payload["invoice_id"]), with_for_update=True
        )
        if invoice is not None and row.payload.get("out_of_band"):
            if invoice.stripe_invoice_id is not None:
                await self.gateway.mark_paid_outside(invoice.stripe_invoice_id, row.identifier)
            return
        if invoice is None or invoice.status is not InvoiceStatus.OPEN:
            return
        if invoice.stripe_invoice_id is None:
            return  # issued first; its issue queues this attempt again
        customer = await session.get(Customer, invoice.customer_id)
        assert customer is not None
        now = datetime.now(UTC)
        error = await self.gateway.pay_invoice(
            invoice.stripe_invoice_id,
            f"{row.identifier}",
            payment_method=customer.payment_method_id,
        )
        if error is None:
            reference = invoice.stripe_invoice_id
            await record_payment(session, invoice.id, reference, self.rules, changes, now=now)
            return
        following = await payment_failed(session, invoice, error, now=now)
        then = f"the next on {following:%Y-%m-%d}" if following else "no attempt left"
        _log.warning("invoice %s: payment attempt %d failed (%s); %s", invoice_name(invoice),
                     invoice.payment_attempts, error, then)  # fmt: skip

    async def _measure(self) -> None:
        async with transaction(self.sessions) as session:
            oldest = await session.scalar(
                sa.select(sa.func.min(StripeOutbox.created_at)).where(
                    StripeOutbox.sent_at.is_(None)
                )
            )
        age = 0.0 if oldest is None else (datetime.now(UTC) - oldest).total_seconds()
        self.metrics.outbox_oldest.set(max(0.0, age))

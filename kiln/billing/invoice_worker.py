"""The invoice worker, part of the billing service: what happens to periods and invoices with
time, each sweep (every 30 s):

- a period closes by itself `KILN_INVOICE_CLOSE_DELAY_S` after it ends (usage reported late
  lands in it first); a close that finished for every customer is remembered in
  `period_closes`, one that did not is simply run again;
- every issued invoice is mailed to its customer's owners once, its PDF attached (through
  `KILN_SMTP_URL`, or into `$KILN_HOME/mail/`);
- an invoice still open `KILN_INVOICE_GRACE_DAYS` after it was issued blocks its customer as
  an empty balance does; paying it lifts the block;
- the owners of a pod idle for `KILN_POD_IDLE_REMINDER_S` are mailed once an idle spell
  (kiln.billing.pod_reminders).

Any number of billing services may sweep at once: closes lock each customer's row, mail claims
its invoices with SKIP LOCKED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from nats.aio.client import Client as NATS
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kiln.billing.invoice_forms import load_document, money, to_pdf
from kiln.billing.invoices import CloseSummary, close_period
from kiln.billing.ledger import BLOCK_INVOICE, BillingRules, Changes, refresh_block
from kiln.billing.plans import Period, period_of
from kiln.billing.pod_reminders import PodReminders
from kiln.billing.worker import announce_blocks
from kiln.console.mail import Attachment, Mail, Mailer
from kiln.db.enums import InvoiceStatus, Settlement, UserRole
from kiln.db.models import Customer, Invoice, PeriodClose, User
from kiln.db.session import transaction
from kiln.errors import Unavailable
from kiln.observability.billing import BillingMetrics
from kiln.seal import Seals
from kiln.settings import Settings
from kiln.wire import Subjects

__all__ = ["InvoiceWorker", "invoice_worker", "last_ended_period"]

_log = logging.getLogger("kiln.billing.invoices")
_SWEEP_S = 30.0
_MAIL_BATCH = 20


def last_ended_period(now: datetime, delay: timedelta) -> Period:
    """The latest period that ended at least `delay` before `now`."""
    current = period_of(now - delay)
    return period_of(current.start - timedelta(microseconds=1))


def invoice_worker(
    settings: Settings,
    nc: NATS,
    sessions: async_sessionmaker[AsyncSession],
    rules: BillingRules,
    metrics: BillingMetrics,
) -> InvoiceWorker:
    """The worker as a billing process runs it, from the settings."""
    mailer = Mailer(settings)
    return InvoiceWorker(
        nc, sessions, rules, mailer, namespace=settings.namespace,
        close_delay_s=settings.invoice_close_delay_s, issuer=settings.invoice_issuer,
        metrics=metrics, signing_key=settings.snapshot_signing_key,
        reminders=PodReminders(sessions, mailer, rules, after_s=settings.pod_idle_reminder_s),
    )  # fmt: skip


class InvoiceWorker:
    def __init__(
        self,
        nc: NATS,
        sessions: async_sessionmaker[AsyncSession],
        rules: BillingRules,
        mailer: Mailer,
        *,
        namespace: str,
        close_delay_s: float,
        issuer: str,
        metrics: BillingMetrics | None = None,
        signing_key: str | None = None,
        reminders: PodReminders | None = None,
    ) -> None:
        """`reminders`: idle pods' reminders, sent at each sweep (None: none)."""
        self.nc = nc
        self.sessions = sessions
        self.rules = rules
        self.mailer = mailer
        self.subjects = Subjects(namespace)
        self.close_delay = timedelta(seconds=close_delay_s)
        self.issuer = issuer
        self.metrics = metrics or BillingMetrics()
        self.seals = Seals(signing_key)
        self.reminders = reminders

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for step, what in (
                (self.close_due, "closing the last period"),
                (self.mail_due, "mailing invoices"),
                (self.block_overdue, "blocking overdue invoices"),
                (self.remind_idle_pods, "reminding the owners of idle pods"),
            ):
                try:
                    await step()
                except Exception:  # noqa: BLE001 - tried again at the next sweep
                    _log.exception("%s failed", what)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _SWEEP_S)

    async def remind_idle_pods(self) -> int:
        return await self.reminders.remind_due() if self.reminders is not None else 0

    async def announce(self, changes: Changes) -> None:
        await announce_blocks(self.nc, self.subjects, changes, seals=self.seals)

    async def close(
        self, period: Period, *, customer_id: uuid.UUID | None = None, now: datetime | None = None
    ) -> CloseSummary:
        """Close `period` (for one customer, or all), counting what it issued."""
        summary = await close_period(
            self.sessions, period, self.rules, customer_id=customer_id, now=now,
            on_changes=self.announce,
        )  # fmt: skip
        if summary.created:
            async with transaction(self.sessions) as session:
                rows = await session.execute(
                    sa.select(
                        Invoice.settlement, sa.func.count(), sa.func.sum(Invoice.total_micros)
                    )
                    .where(Invoice.id.in_(summary.created))
                    .group_by(Invoice.settlement)
                )
                for settlement, count, total in rows:
                    self.metrics.invoices.labels(settlement.value).inc(count)
                    self.metrics.invoiced.labels(settlement.value).inc(max(0, int(total or 0)))
        return summary

    async def close_due(self, now: datetime | None = None) -> CloseSummary | None:
        """Close the last period that ended, unless that was done; what the close did."""
        now = now or datetime.now(UTC)
        period = last_ended_period(now, self.close_delay)
        async with transaction(self.sessions) as session:
            if await session.get(PeriodClose, period.label) is not None:
                return None
        summary = await self.close(period, now=now)
        _log.info(
            "closed %s: %d invoices issued, %d issued before, %d customers with nothing to bill",
            period.label, len(summary.created), len(summary.existing), summary.empty,
        )  # fmt: skip
        return summary

    async def mail_due(self) -> int:
        """Mail the invoices not mailed yet, each in a transaction of its own (its row locked
        while it is sent, so two services never both send it); how many were sent. One that
        fails is logged and tried again at the next sweep; the others go on."""
        sent = 0
        passed_over: set[uuid.UUID] = set()
        while True:
            async with transaction(self.sessions) as session:
                query = (
                    sa.select(Invoice.id)
                    .where(Invoice.status != InvoiceStatus.DRAFT, Invoice.mailed_at.is_(None))
                    .order_by(Invoice.number)
                    .limit(_MAIL_BATCH)
                )
                if passed_over:
                    query = query.where(Invoice.id.not_in(passed_over))
                due = list(await session.scalars(query))
            for invoice_id in due:
                try:
                    async with transaction(self.sessions) as session:
                        invoice = await session.scalar(
                            sa.select(Invoice)
                            .where(Invoice.id == invoice_id, Invoice.mailed_at.is_(None))
                            .with_for_update(skip_locked=True)
                        )
                        if invoice is None:
                            passed_over.add(invoice_id)  # another service has it
                            continue
                        if not await self._mail(session, invoice):
                            return sent  # the mail server is away: the next sweep tries again
                        sent += 1
                except Exception:  # noqa: BLE001 - this invoice next sweep; the others now
                    _log.exception("mailing invoice %s failed", invoice_id)
                    passed_over.add(invoice_id)
            if len(due) < _MAIL_BATCH:
                return sent

    async def _mail(self, session: AsyncSession, invoice: Invoice) -> bool:
        document = await load_document(session, invoice.id)
        assert document is not None
        owners = list(
            await session.scalars(
                sa.select(User.email).where(
                    User.customer_id == invoice.customer_id,
                    User.role == UserRole.OWNER,
                    User.verified_at.is_not(None),
                    User.disabled_at.is_(None),
                )
            )
        )
        pdf = await asyncio.to_thread(to_pdf, document, issuer=self.issuer)
        total = money(invoice.total_micros, invoice.currency)
        if invoice.settlement is Settlement.BALANCE or invoice.status is InvoiceStatus.PAID:
            ask = f"It totals {total}, already paid ({invoice.payment_reference})."
        else:
            ask = f"It totals {total}, due on receipt."
        text = (
            f"Hello {document.customer_name},\n\nyour Kiln invoice {document.name} for "
            f"{invoice.period} is attached. {ask}\n\nThe lines are also at "
            f"GET /v1/billing/invoices/{invoice.id} (?format=pdf or csv).\n"
        )
        for address in owners:
            mail = Mail(
                to=address, subject=f"Kiln invoice {document.name} for {invoice.period}",
                text=text, kind="invoice",
                attachments=(Attachment(f"{document.name}.pdf", pdf, "application/pdf"),),
            )  # fmt: skip
            try:
                await self.mailer.send(mail)
            except Unavailable:
                return False
        invoice.mailed_at = datetime.now(UTC)
        invoice.mailed_to = ", ".join(owners)
        if not owners:
            _log.warning("invoice %s: its customer has no owner to mail it to", document.name)
        return True

    async def block_overdue(self) -> int:
        """Block the customers with an invoice unpaid past the grace period (and count such
        invoices for the metrics); how many blocks were set."""
        due_before = datetime.now(UTC) - timedelta(seconds=self.rules.invoice_grace_s)
        changes = Changes()
        async with transaction(self.sessions) as session:
            overdue = (
                sa.select(Invoice.customer_id)
                .where(Invoice.status == InvoiceStatus.OPEN, Invoice.issued_at < due_before)
                .subquery()
            )
            count = await session.scalar(sa.select(sa.func.count()).select_from(overdue))
            unblocked = await session.scalars(
                sa.select(Customer.id).where(
                    Customer.id.in_(sa.select(overdue.c.customer_id)),
                    Customer.billing_block.is_distinct_from(BLOCK_INVOICE),
                )
            )
            for customer_id in list(unblocked):
                await refresh_block(session, customer_id, self.rules, changes)
        self.metrics.invoices_overdue.set(int(count or 0))
        await self.announce(changes)
        return sum(1 for block in changes.blocks.values() if block == BLOCK_INVOICE)

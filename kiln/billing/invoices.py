"""Closing a billing period into invoices, and what happens to an invoice after: its payment.

A customer's invoice for a period is made in one transaction, with the customer's row locked
(every charge locks it too, so no entry slips in meanwhile):

1. a draft invoice takes every ledger entry of the customer's that no invoice took yet and that
   belongs to the period or an earlier one (a usage entry by when its interval began, any other
   by when it was entered): usage reported late for a closed period goes on the next invoice;
   payments (top-ups, refills, invoice payments) are money received, and no invoice bills them;
2. its lines are computed from exactly what it took: the plan fee and prorations as entered,
   replica time by GPU type (and minimum charges apart), requests past the plan's included
   ones, adjustments and refunds; the total is their sum, brought down to a whole cent by a
   `rounding` credit entered in the ledger beside them; a postpaid invoice whose credits
   outweigh its charges owes nothing and carries the rest of the credit to the next one;
3. it takes the next number (`invoice_counter`: a rolled-back close gives it back, so numbers
   have no gaps), and is finalised: `open` to be collected (a postpaid plan), or `paid` when its
   charges were already debited from a prepaid balance (a statement) or it owes nothing.

A second close of the same customer and period finds the invoice and changes nothing, so a close
killed halfway is finished by running it again. Finalised invoices are immutable (triggers of
migration 0013). With Stripe, a collected invoice is queued in the outbox to be issued as a
Stripe invoice; collection attempts follow `PAYMENT_RETRY_DAYS`, and an invoice still open after
the grace period blocks the customer (`kiln.billing.ledger`) until it is paid.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kiln.billing.ledger import BillingRules, Changes, limits_of, post_entry, refresh_block
from kiln.billing.plans import Period
from kiln.billing.prices import micros_per_minor
from kiln.db.enums import InvoiceLineKind, InvoiceStatus, LedgerKind, OutboxKind, Settlement
from kiln.db.models import (
    Customer,
    Invoice,
    InvoiceCounter,
    InvoiceLine,
    LedgerEntry,
    PeriodClose,
    Pod,
    StorageCharge,
    StripeOutbox,
    UsageEvent,
)
from kiln.db.models_access import DEFAULT_CUSTOMER_ID
from kiln.db.session import transaction
from kiln.errors import Conflict, NotFound

_log = logging.getLogger("kiln.billing.invoices")

__all__ = [
    "PAYMENT_RETRY_DAYS",
    "CloseSummary",
    "close_customer",
    "close_period",
    "invoice_name",
    "payment_failed",
    "queue_collection",
    "record_payment",
]

# After each failed collection, the next attempt comes this many days later; after the last,
# the invoice waits to be paid otherwise (the grace period's block says so).
PAYMENT_RETRY_DAYS = (1, 3, 5, 7)
# Entries no invoice bills: money received.
_PAYMENTS = (LedgerKind.TOPUP, LedgerKind.REFILL, LedgerKind.PAYMENT)
_ONE_BY_ONE = {
    LedgerKind.FEE: InvoiceLineKind.FEE,
    LedgerKind.PRORATION: InvoiceLineKind.PRORATION,
    LedgerKind.ADJUSTMENT: InvoiceLineKind.ADJUSTMENT,
    LedgerKind.REFUND: InvoiceLineKind.REFUND,
}
_MINIMUM_SUFFIX = ":minimum"  # the usage event of a minimum charge (kiln.billing.ledger)
_PAGE = 500  # customers read at a time by a close of everyone
_LANES = 4  # customers closed at once
# Told of each committed close's changes (the blocks it set or lifted), to announce them.
_Announce = Callable[[Changes], Awaitable[None]]


@dataclass
class CloseSummary:
    """What a close did: invoices made now, found made before, and customers with nothing to
    bill."""

    period: str
    created: list[uuid.UUID] = field(default_factory=list)
    existing: list[uuid.UUID] = field(default_factory=list)
    empty: int = 0
    failed: list[uuid.UUID] = field(default_factory=list)  # customers whose close failed


def _moment() -> sa.ColumnElement[datetime]:
    """When a ledger entry's money was spent: a usage interval's start, else its entry."""
    started = (
        sa.select(UsageEvent.period_start)
        .where(UsageEvent.id == LedgerEntry.usage_event_id)
        .scalar_subquery()
    )
    return sa.func.coalesce(started, LedgerEntry.created_at)


async def close_customer(
    session: AsyncSession,
    customer_id: uuid.UUID,
    period: Period,
    rules: BillingRules,
    changes: Changes,
    *,
    now: datetime,
) -> tuple[Invoice | None, bool]:
    """The customer's invoice for `period`, and whether it was made now (None: nothing to bill).
    Call it in a transaction of its own: the invoice commits whole or not at all."""
    customer = await session.get(Customer, customer_id, with_for_update=True)
    if customer is None:
        raise NotFound(f"customer {customer_id} not found", param="customer_id")
    if customer.id == DEFAULT_CUSTOMER_ID:
        return None, False  # the platform's own functions are not billed
    existing = await session.scalar(
        sa.select(Invoice).where(Invoice.customer_id == customer.id, Invoice.period == period.label)
    )
    if existing is not None:
        return existing, False
    limits = limits_of(customer, rules)  # its own overrides decide, as they do for blocks
    settlement = Settlement.BALANCE if limits is not None and limits.prepaid else Settlement.COLLECT
    invoice = Invoice(
        customer_id=customer.id, period=period.label, period_start=period.start,
        period_end=period.end, plan=customer.plan, status=InvoiceStatus.DRAFT,
        settlement=settlement, currency=rules.currency,
    )  # fmt: skip
    session.add(invoice)
    await session.flush()
    taken = await session.execute(
        sa.update(LedgerEntry)
        .where(
            LedgerEntry.customer_id == customer.id,
            LedgerEntry.invoice_id.is_(None),
            LedgerEntry.kind.not_in(_PAYMENTS),
            _moment() < period.end,
        )
        .values(invoice_id=invoice.id)
        .execution_options(synchronize_session=False)
    )
    if not taken.rowcount:  # type: ignore[attr-defined]
        await session.delete(invoice)  # a draft: nothing was billed
        await session.flush()
        return None, False
    lines = await _lines(session, invoice.id)
    total = sum(line.amount_micros for line in lines)
    if rounding := total % micros_per_minor(rules.currency):
        await post_entry(
            session, customer, kind=LedgerKind.ADJUSTMENT, amount=rounding,
            external_id=f"rounding:{invoice.id}", description="invoice total to a whole cent",
            invoice_id=invoice.id, unseen=True,
        )  # fmt: skip
        lines.append(_line(InvoiceLineKind.ROUNDING, "Rounding to a whole cent", -rounding))
        total -= rounding
    if total < 0 and settlement is Settlement.COLLECT:
        await _carry_credit(session, customer, invoice, -total)
        lines.append(
            _line(InvoiceLineKind.ADJUSTMENT, "Credit carried to the next invoice", -total)
        )
        total = 0
    for position, line in enumerate(lines, start=1):
        line.invoice_id, line.position = invoice.id, position
        session.add(line)
    settled = settlement is Settlement.BALANCE or total <= 0
    if not settled and rules.stripe:
        await _queue(session, OutboxKind.INVOICE, f"invoice:{invoice.id}", invoice, now)
    if rounding and settlement is Settlement.BALANCE:  # a prepaid balance grew: a block may lift
        await refresh_block(session, customer.id, rules, changes)
    await session.flush()
    # Last, so that the counter's row is held only for the rest of this transaction: closes of
    # other customers wait on it for no longer than a commit.
    number = await session.scalar(
        sa.update(InvoiceCounter)
        .where(InvoiceCounter.id == 1)
        .values(last=InvoiceCounter.last + 1)
        .returning(InvoiceCounter.last)
    )
    invoice.number = number
    invoice.total_micros = total
    invoice.issued_at = now
    invoice.status = InvoiceStatus.PAID if settled else InvoiceStatus.OPEN
    invoice.paid_at = now if settled else None
    invoice.payment_reference = (
        ("prepaid balance" if settlement is Settlement.BALANCE else "nothing due")
        if settled
        else None
    )
    await session.flush()
    return invoice, True


async def _carry_credit(
    session: AsyncSession, customer: Customer, invoice: Invoice, credit: int
) -> None:
    """A postpaid invoice whose credits outweigh its charges owes nothing, and what is left of
    the credit goes on the next invoice: it leaves this one (an entry the invoice takes) and
    comes back beside it (an entry no invoice took yet). The balance does not move."""
    await post_entry(
        session, customer, kind=LedgerKind.ADJUSTMENT, amount=-credit,
        external_id=f"carry:{invoice.id}:out", description="credit carried to the next invoice",
        invoice_id=invoice.id, unseen=True,
    )  # fmt: skip
    await post_entry(
        session, customer, kind=LedgerKind.ADJUSTMENT, amount=credit,
        external_id=f"carry:{invoice.id}:in",
        description=f"credit carried from the invoice of {invoice.period}", unseen=True,
    )  # fmt: skip


def _line(
    kind: InvoiceLineKind,
    description: str,
    amount: int,
    *,
    quantity: int = 1,
    unit: str = "item",
    gpu_type: str | None = None,
) -> InvoiceLine:
    return InvoiceLine(
        kind=kind, description=description, quantity=quantity, unit=unit, gpu_type=gpu_type,
        amount_micros=amount,
    )  # fmt: skip


async def _lines(session: AsyncSession, invoice_id: uuid.UUID) -> list[InvoiceLine]:
    """The lines of what the invoice took, charges positive: fees and prorations, adjustments
    and refunds one by one, as entered; replica time by GPU type (minimum charges apart); the
    requests charged."""
    entries = await session.execute(
        sa.select(LedgerEntry.kind, LedgerEntry.amount_micros, LedgerEntry.description)
        .where(
            LedgerEntry.invoice_id == invoice_id,
            LedgerEntry.kind.not_in((LedgerKind.USAGE, LedgerKind.STORAGE)),
        )
        .order_by(LedgerEntry.created_at, LedgerEntry.id)
    )
    singles = [
        _line(_ONE_BY_ONE[kind], description or kind.value, -amount)
        for kind, amount, description in entries
    ]
    minimum = UsageEvent.id.endswith(_MINIMUM_SUFFIX)
    gpu = sa.func.coalesce(UsageEvent.gpu_type, "none")
    usage = await session.execute(
        sa.select(
            gpu.label("gpu"),
            minimum.label("minimum"),
            sa.func.sum(UsageEvent.duration_ms * sa.func.greatest(UsageEvent.gpu_count, 1)),
            # The interval's GPU part: its entry less its requests' (also for intervals charged
            # before plans, which kept no parts).
            sa.func.sum(-LedgerEntry.amount_micros - UsageEvent.request_cost_micros),
            sa.func.sum(UsageEvent.billed_requests),
            sa.func.sum(UsageEvent.request_cost_micros),
        )
        .select_from(LedgerEntry)
        .join(UsageEvent, UsageEvent.id == LedgerEntry.usage_event_id)
        .where(LedgerEntry.invoice_id == invoice_id)
        .group_by(gpu, minimum)
        .order_by(minimum, gpu)
    )
    time_lines: list[InvoiceLine] = []
    requests = request_cost = 0
    for gpu_type, is_minimum, gpu_ms, cost, billed, billed_cost in usage:
        name = "CPU" if gpu_type == "none" else gpu_type
        kind = InvoiceLineKind.MINIMUM if is_minimum else InvoiceLineKind.GPU
        what = f"Minimum charge, {name} time" if is_minimum else f"{name} time"
        if gpu_ms or cost:  # intervals that only counted calls took no time
            time_lines.append(
                _line(kind, what, int(cost), quantity=int(gpu_ms), unit="gpu_ms", gpu_type=gpu_type)
            )
        requests += int(billed)
        request_cost += int(billed_cost)
    if requests or request_cost:
        time_lines.append(
            _line(
                InvoiceLineKind.REQUESTS,
                f"{requests:,} requests past the plan's included",
                request_cost,
                quantity=requests,
                unit="requests",
            )
        )
    storage = await session.execute(
        sa.select(
            Pod.name,
            StorageCharge.gb,
            sa.func.sum(sa.extract("epoch", StorageCharge.period_end - StorageCharge.period_start)),
            sa.func.sum(-LedgerEntry.amount_micros),
        )
        .select_from(LedgerEntry)
        .join(StorageCharge, StorageCharge.ledger_entry_id == LedgerEntry.id)
        .join(Pod, Pod.id == StorageCharge.pod_id)
        .where(LedgerEntry.invoice_id == invoice_id)
        .group_by(Pod.id, Pod.name, StorageCharge.gb)
        .order_by(Pod.name, Pod.id)
    )
    volumes = [
        _line(
            InvoiceLineKind.STORAGE,
            f"Volume of pod {name}, {gb} GB",
            int(cost),
            quantity=round(gb * seconds),
            unit="gb_s",
        )
        for name, gb, seconds, cost in storage
    ]
    fees = [
        line for line in singles if line.kind in (InvoiceLineKind.FEE, InvoiceLineKind.PRORATION)
    ]
    others = [line for line in singles if line not in fees]
    return [*fees, *time_lines, *volumes, *others]


async def _queue(
    session: AsyncSession,
    kind: OutboxKind,
    identifier: str,
    invoice: Invoice,
    at: datetime,
    *,
    out_of_band: bool = False,
) -> None:
    await session.execute(
        insert(StripeOutbox)
        .values(
            kind=kind,
            identifier=identifier,
            customer_id=invoice.customer_id,
            payload={
                "invoice_id": str(invoice.id),
                **({"out_of_band": True} if out_of_band else {}),
            },
            next_attempt_at=at,
        )
        .on_conflict_do_nothing(index_elements=[StripeOutbox.identifier])
    )


async def close_period(
    sessions: async_sessionmaker[AsyncSession],
    period: Period,
    rules: BillingRules,
    *,
    customer_id: uuid.UUID | None = None,
    now: datetime | None = None,
    on_changes: _Announce | None = None,
) -> CloseSummary:
    """Close `period` for one customer or for every customer (each in its own transaction, so a
    close killed halfway keeps what it finished and a rerun does the rest). Closing every
    customer of a period that has ended is remembered in `period_closes`."""
    now = now or datetime.now(UTC)
    summary = CloseSummary(period.label)
    if customer_id is not None:
        await _close_one(sessions, customer_id, period, rules, now, summary, on_changes)
        return summary
    after: uuid.UUID | None = None
    while True:
        async with transaction(sessions) as session:
            query = (
                sa.select(Customer.id, Invoice.id)
                .outerjoin(
                    Invoice, (Invoice.customer_id == Customer.id) & (Invoice.period == period.label)
                )
                .where(Customer.id != DEFAULT_CUSTOMER_ID, Customer.created_at < period.end)
                .order_by(Customer.id)
                .limit(_PAGE)
            )
            if after is not None:
                query = query.where(Customer.id > after)
            page = (await session.execute(query)).all()
        if not page:
            break
        summary.existing += [invoice_id for _, invoice_id in page if invoice_id is not None]
        due = [customer for customer, invoice_id in page if invoice_id is None]

        async def close_some(share: Sequence[uuid.UUID]) -> None:
            for each in share:
                try:
                    await _close_one(sessions, each, period, rules, now, summary, on_changes)
                except Exception:  # noqa: BLE001 - the others are closed; this one next time
                    _log.exception("closing %s for customer %s failed", period.label, each)
                    summary.failed.append(each)

        # A few customers at once: each waits mostly on the database, and the transactions
        # only queue on the invoice counter for their last statement and commit.
        async with asyncio.TaskGroup() as closing:
            for lane in range(_LANES):
                closing.create_task(close_some(due[lane::_LANES]))
        after = page[-1][0]
    if now >= period.end and not summary.failed:  # else the next sweep tries again
        async with transaction(sessions) as session:
            await session.execute(
                insert(PeriodClose)
                .values(period=period.label, invoices=len(summary.created) + len(summary.existing))
                .on_conflict_do_nothing(index_elements=[PeriodClose.period])
            )
    return summary


async def _close_one(
    sessions: async_sessionmaker[AsyncSession],
    customer_id: uuid.UUID,
    period: Period,
    rules: BillingRules,
    now: datetime,
    summary: CloseSummary,
    on_changes: _Announce | None,
) -> None:
    changes = Changes()
    async with transaction(sessions) as session:
        invoice, made = await close_customer(session, customer_id, period, rules, changes, now=now)
    if on_changes is not None:
        await on_changes(changes)
    if invoice is None:
        summary.empty += 1
    elif made:
        summary.created.append(invoice.id)
    else:
        summary.existing.append(invoice.id)


async def record_payment(
    session: AsyncSession,
    invoice_id: uuid.UUID,
    reference: str,
    rules: BillingRules,
    changes: Changes,
    *,
    now: datetime,
    outside_stripe: bool = False,
) -> bool:
    """The invoice was paid (Stripe said so, or an operator received it: `outside_stripe`):
    mark it paid and credit the customer once; whether this call did. Paying lifts a block it
    caused. A Stripe invoice paid outside Stripe is marked so there too (through the outbox),
    so Stripe neither charges it nor lets it be paid twice."""
    invoice = await session.get(Invoice, invoice_id, with_for_update=True)
    if invoice is None:
        raise NotFound(f"invoice {invoice_id} not found")
    if invoice.status is InvoiceStatus.PAID:
        return False
    if invoice.status is not InvoiceStatus.OPEN:
        raise Conflict(f"invoice {invoice_id} is not open for payment")
    customer = await session.get(Customer, invoice.customer_id, with_for_update=True)
    assert customer is not None
    await post_entry(
        session, customer, kind=LedgerKind.PAYMENT, amount=invoice.total_micros,
        external_id=f"invoice:{invoice.id}:paid",
        description=f"invoice {invoice_name(invoice)} paid ({reference})",
    )  # fmt: skip
    invoice.status = InvoiceStatus.PAID
    invoice.paid_at = now
    invoice.payment_reference = reference[:255]
    invoice.payment_error = None
    await session.flush()
    if outside_stripe and invoice.stripe_invoice_id is not None:
        await _queue(session, OutboxKind.INVOICE_PAYMENT, f"invoice:{invoice.id}:out-of-band",
                     invoice, now, out_of_band=True)  # fmt: skip
    await refresh_block(session, customer.id, rules, changes)
    return True


async def payment_failed(
    session: AsyncSession, invoice: Invoice, error: str, *, now: datetime
) -> datetime | None:
    """A collection attempt of the (locked, open) invoice failed: count it and queue the next
    attempt on the schedule; when that comes (None: no attempt left)."""
    invoice.payment_attempts += 1
    invoice.payment_error = error[:2000]
    await session.flush()
    if invoice.payment_attempts > len(PAYMENT_RETRY_DAYS):
        return None
    at = now + timedelta(days=PAYMENT_RETRY_DAYS[invoice.payment_attempts - 1])
    await queue_collection(session, invoice, attempt=invoice.payment_attempts + 1, at=at)
    return at


async def queue_collection(
    session: AsyncSession, invoice: Invoice, *, attempt: int, at: datetime
) -> None:
    """Queue collection attempt number `attempt` of the invoice for `at` (once: its identifier,
    the idempotency key Stripe sees, names the attempt)."""
    identifier = f"invoice:{invoice.id}:pay:{attempt}"
    await _queue(session, OutboxKind.INVOICE_PAYMENT, identifier, invoice, at)


def invoice_name(invoice: Invoice) -> str:
    """What people call it: INV-000042."""
    return f"INV-{invoice.number:06d}" if invoice.number is not None else "draft"

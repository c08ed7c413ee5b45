"""The money rules, each applied inside the caller's transaction so that a change and its
consequences commit together or not at all:

- a usage report is charged once (its event id is the key), debiting the balance, adding to the
  day's spend and, with Stripe, queueing a meter event in the outbox;
- the charge that takes the balance below the refill threshold queues exactly one refill for
  that crossing (the customer row is locked by the debit, so concurrent charges take turns and
  only one of them sees the crossing);
- a customer whose prepaid balance is used up with nothing refilling it, or whose day's spend
  reached the cap, is blocked: routers answer 402 and the scheduler scales their replicas to
  zero. A credit, a new day or a raised cap lifts the block;
- a payment is credited once, whichever of Stripe's events about it comes first or again.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.billing.prices import cost_micros
from kiln.db.enums import InvoiceStatus, LedgerKind, OutboxKind, PaymentKind, PaymentStatus
from kiln.db.models import (
    Customer,
    DailySpend,
    Invoice,
    LedgerEntry,
    Payment,
    PeriodRequests,
    Plan,
    StripeOutbox,
    UsageEvent,
)
from kiln.db.models_access import DEFAULT_CUSTOMER_ID
from kiln.settings import Settings
from kiln.tiers import TierLimits, with_overrides
from kiln.wire import UsageReport

__all__ = [
    "BLOCK_BALANCE",
    "BLOCK_INVOICE",
    "BLOCK_SPEND_CAP",
    "BillingRules",
    "Changes",
    "billing_rules",
    "charge_usage",
    "credit_payment",
    "fail_payment",
    "limits_of",
    "post_entry",
    "refresh_block",
]

BLOCK_BALANCE = "balance"
BLOCK_SPEND_CAP = "spend_cap"
BLOCK_INVOICE = "invoice"  # an invoice unpaid past the grace period


@dataclass(frozen=True, kw_only=True)
class BillingRules:
    """The settings billing acts on (`billing_rules` reads them; their defaults are Settings')."""

    prices: Mapping[str, int]
    tiers: Mapping[str, TierLimits]
    stripe: bool  # meter events and refills go to Stripe
    meter_event: str
    refill_max_failures: int
    min_charge_s: int  # a replica is billed at least this long (0: no minimum)
    currency: str = "usd"
    invoice_grace_s: float = 14 * 86_400.0  # an open invoice older than this blocks
    volume_price_gb_hour: int = 0  # micro-units for a GB of a pod's volume for an hour


def billing_rules(settings: Settings) -> BillingRules:
    return BillingRules(
        prices=settings.gpu_prices,
        tiers=settings.tier_limits,
        stripe=settings.stripe_enabled,
        meter_event=settings.stripe_meter_event,
        refill_max_failures=settings.refill_max_failures,
        min_charge_s=settings.min_charge_s,
        currency=settings.currency,
        invoice_grace_s=settings.invoice_grace_days * 86_400.0,
        volume_price_gb_hour=settings.volume_price_gb_hour,
    )


@dataclass
class Changes:
    """What a transaction changed that others must hear of once it commits."""

    charged: int = 0
    blocks: dict[uuid.UUID, str | None] = field(default_factory=dict)  # customer → new block
    refills: list[str] = field(default_factory=list)  # payment ids queued
    # (tier, GPU type) → [milliseconds, micro-units] charged, for the metrics.
    usage: dict[tuple[str, str], list[int]] = field(default_factory=dict)


def _utc_day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


async def charge_usage(
    session: AsyncSession, report: UsageReport, rules: BillingRules, changes: Changes
) -> bool:
    """Charge `report` unless it was charged before; whether it was new. The caller has
    checked that its ids parse."""
    customer_id = uuid.UUID(report.customer_id)
    start = datetime.fromtimestamp(report.period_start, UTC)
    end = datetime.fromtimestamp(max(report.period_start, report.period_end), UTC)
    duration_ms = round((end - start).total_seconds() * 1000)
    inserted = await session.scalar(
        insert(UsageEvent)
        .values(
            id=report.event_id,
            replica_id=uuid.UUID(report.replica_id),
            customer_id=customer_id,
            function_id=uuid.UUID(report.function_id),
            gpu_type=None if report.gpu_type == "none" else report.gpu_type,
            gpu_count=report.gpu_count,
            period_start=start,
            period_end=end,
            duration_ms=duration_ms,
            calls=max(0, report.calls),
        )
        .on_conflict_do_nothing(index_elements=[UsageEvent.id])
        .returning(UsageEvent.id)
    )
    if inserted is None:
        return False  # charged before
    plan = (
        await session.execute(
            sa.select(Plan)
            .join(Customer, Customer.plan == Plan.name)
            .where(Customer.id == customer_id)
        )
    ).scalar_one()
    prices = {**rules.prices, **plan.gpu_prices} if plan.gpu_prices else rules.prices
    gpu_cost = cost_micros(prices, report.gpu_type, report.gpu_count, duration_ms)
    billed = await _billed_requests(session, customer_id, start, max(0, report.calls), plan)
    request_cost = billed * plan.request_price_micros
    cost = gpu_cost + request_cost
    await session.execute(
        sa.update(UsageEvent)
        .where(UsageEvent.id == report.event_id)
        .values(gpu_cost_micros=gpu_cost, billed_requests=billed, request_cost_micros=request_cost)
    )
    # The debit locks the customer's row until commit: crossings are seen by one charge only.
    customer = (
        await session.execute(
            sa.update(Customer)
            .where(Customer.id == customer_id)
            .values(balance_micros=Customer.balance_micros - cost)
            .returning(Customer)
        )
    ).scalar_one()
    session.add(
        LedgerEntry(
            customer_id=customer_id,
            kind=LedgerKind.USAGE,
            amount_micros=-cost,
            balance_after_micros=customer.balance_micros,
            usage_event_id=report.event_id,
            description=f"{duration_ms} ms of {report.gpu_count}x {report.gpu_type}"
            + (f", {billed} requests" if billed else ""),
        )
    )
    spent = await _add_spend(session, customer_id, _utc_day(end), cost)
    if _utc_day(end) != _utc_day(datetime.now(UTC)):  # a late report: today decides the cap
        spent = await _spent_on(session, customer_id, _utc_day(datetime.now(UTC)))
    if rules.stripe and duration_ms > 0:
        await _queue(
            session,
            OutboxKind.METER_EVENT,
            report.event_id,
            customer_id,
            {
                "event_name": rules.meter_event,
                "value": duration_ms,
                "timestamp": int(end.timestamp()),
                "gpu_type": report.gpu_type,
            },
        )
    before = customer.balance_micros + cost
    if _crossed_refill(customer, before, rules):
        await _queue_refill(session, customer, changes)
    await _set_block(session, customer, rules, changes, spent_today=spent)
    if report.final and rules.min_charge_s > 0 and report.since:
        await _charge_minimum(session, report, rules, changes)
    # A GPU type without a price is charged as a CPU slot; one label value stands for them all.
    gpu = report.gpu_type if report.gpu_type in rules.prices else "other"
    totals = changes.usage.setdefault((str(customer.tier), gpu), [0, 0])
    totals[0] += duration_ms
    totals[1] += cost
    changes.charged += 1
    return True


async def _billed_requests(
    session: AsyncSession, customer_id: uuid.UUID, start: datetime, calls: int, plan: Plan
) -> int:
    """Count `calls` in the customer's period; how many of them are past the plan's included
    requests (and so charged at its request price)."""
    if calls == 0 or customer_id == DEFAULT_CUSTOMER_ID:  # the platform's own functions
        return 0
    period = f"{start.year:04d}-{start.month:02d}"
    after = await session.scalar(
        insert(PeriodRequests)
        .values(customer_id=customer_id, period=period, requests=calls)
        .on_conflict_do_update(
            index_elements=[PeriodRequests.customer_id, PeriodRequests.period],
            set_={"requests": PeriodRequests.requests + calls},
        )
        .returning(PeriodRequests.requests)
    )
    before = int(after or calls) - calls
    free = max(0, plan.included_requests - before)
    return max(0, calls - free) if plan.request_price_micros else 0


async def _charge_minimum(
    session: AsyncSession, report: UsageReport, rules: BillingRules, changes: Changes
) -> None:
    """A replica that lived less than the minimum charge is billed as if it lived that long:
    one more interval, `<replica>:minimum`, from its end to the minimum (charged once, whichever
    final report comes first)."""
    lived = report.period_end - report.since
    if lived >= rules.min_charge_s:
        return
    top_up = UsageReport(
        event_id=f"{report.replica_id}:minimum", replica_id=report.replica_id,
        customer_id=report.customer_id, function_id=report.function_id,
        gpu_type=report.gpu_type, gpu_count=report.gpu_count,
        period_start=report.period_end, period_end=report.since + rules.min_charge_s,
        since=report.since,
    )  # fmt: skip
    if await charge_usage(session, top_up, rules, changes):
        changes.charged -= 1  # counted with the report that caused it


async def _add_spend(session: AsyncSession, customer_id: uuid.UUID, day: date, cost: int) -> int:
    spent = await session.scalar(
        insert(DailySpend)
        .values(customer_id=customer_id, day=day, spent_micros=cost)
        .on_conflict_do_update(
            index_elements=[DailySpend.customer_id, DailySpend.day],
            set_={"spent_micros": DailySpend.spent_micros + cost},
        )
        .returning(DailySpend.spent_micros)
    )
    return int(spent or 0)


async def _spent_on(session: AsyncSession, customer_id: uuid.UUID, day: date) -> int:
    spent = await session.scalar(
        sa.select(DailySpend.spent_micros).where(
            DailySpend.customer_id == customer_id, DailySpend.day == day
        )
    )
    return int(spent or 0)


def _crossed_refill(customer: Customer, before: int, rules: BillingRules) -> bool:
    threshold = customer.refill_threshold_micros
    return (
        rules.stripe
        and threshold is not None
        and customer.refill_failures < rules.refill_max_failures
        and customer.payment_method_id is not None
        and before >= threshold > customer.balance_micros
    )


async def _queue_refill(session: AsyncSession, customer: Customer, changes: Changes) -> None:
    customer.refill_crossings += 1
    payment_id = f"refill:{customer.id}:{customer.refill_crossings}"
    assert customer.refill_amount_micros is not None
    session.add(
        Payment(
            id=payment_id,
            customer_id=customer.id,
            kind=PaymentKind.REFILL,
            amount_micros=customer.refill_amount_micros,
        )
    )
    await _queue(
        session,
        OutboxKind.REFILL,
        payment_id,
        customer.id,
        {"amount_micros": customer.refill_amount_micros},
    )
    changes.refills.append(payment_id)


async def _queue(
    session: AsyncSession,
    kind: OutboxKind,
    identifier: str,
    customer_id: uuid.UUID,
    payload: dict[str, Any],
) -> None:
    await session.execute(
        insert(StripeOutbox)
        .values(kind=kind, identifier=identifier, customer_id=customer_id, payload=payload)
        .on_conflict_do_nothing(index_elements=[StripeOutbox.identifier])
    )


def limits_of(customer: Customer, rules: BillingRules) -> TierLimits | None:
    """The customer's limits: its tier's, with its own overrides (`prepaid` among them)."""
    tier = rules.tiers.get(customer.tier.value)
    if tier is None:
        return None
    try:
        return with_overrides(tier, customer.limit_overrides)
    except ValueError:
        return tier


async def _refill_pending(session: AsyncSession, customer_id: uuid.UUID) -> bool:
    pending = await session.scalar(
        sa.select(sa.func.count())
        .select_from(Payment)
        .where(
            Payment.customer_id == customer_id,
            Payment.kind == PaymentKind.REFILL,
            Payment.status == PaymentStatus.PENDING,
        )
    )
    return bool(pending)


async def _block_for(
    session: AsyncSession, customer: Customer, rules: BillingRules, spent_today: int
) -> str | None:
    if customer.id == DEFAULT_CUSTOMER_ID:
        return None  # the platform's own functions
    if customer.spend_cap_micros is not None and spent_today >= customer.spend_cap_micros:
        return BLOCK_SPEND_CAP
    if await _invoice_overdue(session, customer.id, rules):
        return BLOCK_INVOICE
    limits = limits_of(customer, rules)
    if limits is None or not limits.prepaid or customer.balance_micros > 0:
        return None
    if await _refill_pending(session, customer.id):
        return None  # money is on its way; the overdraft stays bounded by one refill's wait
    return BLOCK_BALANCE


async def _invoice_overdue(
    session: AsyncSession, customer_id: uuid.UUID, rules: BillingRules
) -> bool:
    """Whether an invoice of the customer's is still unpaid past the grace period."""
    due_before = datetime.now(UTC) - timedelta(seconds=rules.invoice_grace_s)
    overdue = await session.scalar(
        sa.select(Invoice.id)
        .where(
            Invoice.customer_id == customer_id,
            Invoice.status == InvoiceStatus.OPEN,
            Invoice.issued_at < due_before,
        )
        .limit(1)
    )
    return overdue is not None


async def _set_block(
    session: AsyncSession,
    customer: Customer,
    rules: BillingRules,
    changes: Changes,
    *,
    spent_today: int,
) -> None:
    block = await _block_for(session, customer, rules, spent_today)
    if block != customer.billing_block:
        customer.billing_block = block
        changes.blocks[customer.id] = block
        await session.flush()  # written now: a refresh of the row must not undo it


async def refresh_block(
    session: AsyncSession, customer_id: uuid.UUID, rules: BillingRules, changes: Changes
) -> None:
    """Decide the customer's block again (after a credit, a failed refill, a new day or new
    settings), locking their row."""
    customer = await session.get(Customer, customer_id, with_for_update=True)
    if customer is None:
        return
    spent = await _spent_on(session, customer_id, _utc_day(datetime.now(UTC)))
    await _set_block(session, customer, rules, changes, spent_today=spent)


async def post_entry(
    session: AsyncSession,
    customer: Customer,
    *,
    kind: LedgerKind,
    amount: int,
    external_id: str,
    description: str,
    invoice_id: uuid.UUID | None = None,
    unseen: bool = False,
) -> bool:
    """Move `amount` on the customer's balance with a ledger entry, unless `external_id` was
    posted before (`unseen`: the caller knows it was not); whether it was new. The customer's
    row is locked by the caller."""
    if not unseen:
        exists = await session.scalar(
            sa.select(LedgerEntry.id).where(LedgerEntry.external_id == external_id)
        )
        if exists is not None:
            return False
    customer.balance_micros += amount
    session.add(
        LedgerEntry(
            customer_id=customer.id,
            kind=kind,
            amount_micros=amount,
            balance_after_micros=customer.balance_micros,
            external_id=external_id,
            description=description,
            invoice_id=invoice_id,
        )
    )
    await session.flush()
    return True


async def credit_payment(
    session: AsyncSession,
    payment_id: str,
    rules: BillingRules,
    changes: Changes,
    *,
    payment_intent_id: str | None = None,
) -> bool:
    """Credit a succeeded payment once; whether this call credited it."""
    payment = await session.get(Payment, payment_id, with_for_update=True)
    if payment is None or payment.status is PaymentStatus.SUCCEEDED:
        return False
    payment.status = PaymentStatus.SUCCEEDED
    payment.error = None
    if payment_intent_id and payment.payment_intent_id is None:
        payment.payment_intent_id = payment_intent_id
    customer = await session.get(Customer, payment.customer_id, with_for_update=True)
    assert customer is not None
    customer.balance_micros += payment.amount_micros
    if payment.kind is PaymentKind.REFILL:
        customer.refill_failures = 0
    kind = LedgerKind.REFILL if payment.kind is PaymentKind.REFILL else LedgerKind.TOPUP
    session.add(
        LedgerEntry(
            customer_id=customer.id,
            kind=kind,
            amount_micros=payment.amount_micros,
            balance_after_micros=customer.balance_micros,
            external_id=payment_id,
            description=f"{kind.value} {payment_intent_id or payment_id}",
        )
    )
    await session.flush()
    await refresh_block(session, customer.id, rules, changes)
    return True


async def fail_payment(
    session: AsyncSession, payment_id: str, error: str, rules: BillingRules, changes: Changes
) -> bool:
    """A payment failed (declined card, expired checkout). A succeeded payment stays
    succeeded whatever arrives after; a failed refill counts toward turning refills off."""
    payment = await session.get(Payment, payment_id, with_for_update=True)
    if payment is None or payment.status is not PaymentStatus.PENDING:
        return False
    payment.status = PaymentStatus.FAILED
    payment.error = error[:2000]
    if payment.kind is PaymentKind.REFILL:
        await session.execute(
            sa.update(Customer)
            .where(Customer.id == payment.customer_id)
            .values(refill_failures=Customer.refill_failures + 1)
        )
    await session.flush()
    await refresh_block(session, payment.customer_id, rules, changes)
    return True

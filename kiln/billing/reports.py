"""Usage and revenue reports, straight from the ledger's tables.

A usage interval counts in the hour or day its start falls in (an interval lasts at most a few
seconds, so that is where its time was spent); its cost is the ledger entry that charged it, so
a report adds up to the balance's history to the micro-unit. Revenue from the ledger is by
each customer's current tier; revenue from invoices is by the plan each invoice was issued
under, and monthly recurring revenue is what today's customers' plan fees add up to.
"""

from __future__ import annotations

import csv
import enum
import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.db.enums import CustomerStatus, InvoiceStatus, LedgerKind
from kiln.db.models import App, Customer, Function, Invoice, LedgerEntry, Plan, UsageEvent
from kiln.db.models_access import DEFAULT_CUSTOMER_ID

__all__ = [
    "Granularity",
    "UsageQuery",
    "monthly_recurring_revenue",
    "plan_revenue_rows",
    "revenue_rows",
    "to_csv",
    "usage_rows",
]

GROUPS = ("function", "gpu_type")


class Granularity(enum.StrEnum):
    HOUR = "hour"
    DAY = "day"


@dataclass(frozen=True)
class UsageQuery:
    customer_id: uuid.UUID
    since: datetime
    until: datetime
    granularity: Granularity = Granularity.DAY
    group_by: Sequence[str] = GROUPS


def _period(column: Any, granularity: Granularity) -> Any:
    return sa.func.date_trunc(granularity.value, sa.func.timezone("UTC", column))


async def usage_rows(session: AsyncSession, query: UsageQuery) -> list[dict[str, Any]]:
    """Replica-seconds, calls and cost by period (and function and GPU type, as asked)."""
    period = _period(UsageEvent.period_start, query.granularity).label("period")
    function = sa.func.coalesce(
        App.name + "/" + Function.name, sa.cast(UsageEvent.function_id, sa.String)
    ).label("function")
    gpu = sa.func.coalesce(UsageEvent.gpu_type, "none").label("gpu_type")
    keys: list[Any] = [period]
    if "function" in query.group_by:
        keys.append(function)
    if "gpu_type" in query.group_by:
        keys.append(gpu)
    rows = await session.execute(
        sa.select(
            *keys,
            sa.func.sum(UsageEvent.duration_ms).label("ms"),
            sa.func.sum(UsageEvent.calls).label("calls"),
            sa.func.sum(-LedgerEntry.amount_micros).label("cost"),
        )
        .join(LedgerEntry, LedgerEntry.usage_event_id == UsageEvent.id)
        .outerjoin(Function, Function.id == UsageEvent.function_id)
        .outerjoin(App, App.id == Function.app_id)
        .where(
            UsageEvent.customer_id == query.customer_id,
            UsageEvent.period_start >= query.since,
            UsageEvent.period_start < query.until,
        )
        .group_by(*keys)
        .order_by(*keys)
    )
    result = []
    for row in rows:
        item: dict[str, Any] = {"period": row.period.isoformat() + "Z"}
        if "function" in query.group_by:
            item["function"] = row.function
        if "gpu_type" in query.group_by:
            item["gpu_type"] = row.gpu_type
        item.update(
            replica_seconds=int(row.ms or 0) / 1000,
            calls=int(row.calls or 0),
            cost_micros=int(row.cost or 0),
        )
        result.append(item)
    return result


async def revenue_rows(
    session: AsyncSession, since: datetime, until: datetime, granularity: Granularity
) -> list[dict[str, Any]]:
    """For operators: by period and tier, the customers charged, replica-seconds, usage
    revenue and payments received."""
    period = _period(LedgerEntry.created_at, granularity).label("period")
    usage = LedgerEntry.kind == LedgerKind.USAGE
    paid = LedgerEntry.kind.in_([LedgerKind.TOPUP, LedgerKind.REFILL])
    rows = await session.execute(
        sa.select(
            period,
            Customer.tier,
            sa.func.count(sa.distinct(sa.case((usage, LedgerEntry.customer_id)))).label(
                "customers"
            ),
            sa.func.coalesce(sa.func.sum(sa.case((usage, UsageEvent.duration_ms))), 0).label("ms"),
            sa.func.coalesce(sa.func.sum(sa.case((usage, -LedgerEntry.amount_micros))), 0).label(
                "revenue"
            ),
            sa.func.coalesce(sa.func.sum(sa.case((paid, LedgerEntry.amount_micros))), 0).label(
                "payments"
            ),
        )
        .join(Customer, Customer.id == LedgerEntry.customer_id)
        .outerjoin(UsageEvent, UsageEvent.id == LedgerEntry.usage_event_id)
        .where(LedgerEntry.created_at >= since, LedgerEntry.created_at < until)
        .group_by(period, Customer.tier)
        .order_by(period, Customer.tier)
    )
    return [
        {
            "period": row.period.isoformat() + "Z",
            "tier": row.tier.value,
            "customers": int(row.customers),
            "replica_seconds": int(row.ms) / 1000,
            "usage_revenue_micros": int(row.revenue),
            "payments_micros": int(row.payments),
        }
        for row in rows
    ]


async def plan_revenue_rows(
    session: AsyncSession, *, since: str | None = None, until: str | None = None
) -> list[dict[str, Any]]:
    """For operators, from the invoices issued: by period (YYYY-MM, from `since` to `until`
    inclusive) and the plan each customer was on at the close, the invoices, what they total,
    what was paid and what is still owed. Statements of prepaid balances count as paid."""
    paid = Invoice.status == InvoiceStatus.PAID
    query = (
        sa.select(
            Invoice.period,
            Invoice.plan,
            sa.func.count().label("invoices"),
            sa.func.sum(Invoice.total_micros).label("invoiced"),
            sa.func.coalesce(sa.func.sum(sa.case((paid, Invoice.total_micros))), 0).label("paid"),
        )
        .where(Invoice.status != InvoiceStatus.DRAFT)
        .group_by(Invoice.period, Invoice.plan)
        .order_by(Invoice.period, Invoice.plan)
    )
    if since is not None:
        query = query.where(Invoice.period >= since)
    if until is not None:
        query = query.where(Invoice.period <= until)
    return [
        {
            "period": row.period,
            "plan": row.plan,
            "invoices": int(row.invoices),
            "invoiced_micros": int(row.invoiced),
            "paid_micros": int(row.paid),
            "outstanding_micros": int(row.invoiced) - int(row.paid),
        }
        for row in await session.execute(query)
    ]


async def monthly_recurring_revenue(session: AsyncSession) -> dict[str, tuple[int, int]]:
    """By plan with a fee: (what its active customers' monthly fees add up to, how many they
    are). The platform's own customer pays none."""
    rows = await session.execute(
        sa.select(Plan.name, sa.func.count(Customer.id), sa.func.sum(Plan.monthly_fee_micros))
        .join(Customer, Customer.plan == Plan.name)
        .where(
            Plan.monthly_fee_micros > 0,
            Customer.status == CustomerStatus.ACTIVE,
            Customer.id != DEFAULT_CUSTOMER_ID,
        )
        .group_by(Plan.name)
        .order_by(Plan.name)
    )
    return {str(name): (int(total or 0), int(count)) for name, count, total in rows}


def to_csv(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(
        out, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()

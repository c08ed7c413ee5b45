"""Plans and what they charge outside usage: the monthly fee, charged for each billing period
(a calendar month in UTC), and the proration of a plan change within one.

Both are ledger entries applied in the caller's transaction, with the customer's row locked,
so a fee and the balance it moves commit together or not at all:

- `charge_period_fee` charges a customer's plan fee for a period once (the entry's external id
  is `fee:<customer>:<YYYY-MM>`), for the part of the period the customer was on the plan
  (from `plan_since` when that falls inside it). A prepaid customer's balance that cannot pay
  it blocks as an empty balance does (`refresh_block`).
- `change_plan` moves a customer to another plan at once: the period's fee for the old plan is
  charged first if it was not yet, then the unused part of it comes back and the new plan's fee
  for the rest of the period is charged, both as `proration` entries, so that the month costs
  each plan's fee for the time spent on it.

Every amount is integer micro-units, rounded toward the customer (credits down, charges down).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.billing.ledger import BillingRules, Changes, post_entry, refresh_block
from kiln.db.enums import LedgerKind
from kiln.db.models import Customer, LedgerEntry, Plan
from kiln.db.models_access import DEFAULT_CUSTOMER_ID
from kiln.errors import NotFound

__all__ = [
    "Period",
    "change_plan",
    "charge_due_fees",
    "charge_period_fee",
    "period_of",
    "plan_named",
]


@dataclass(frozen=True)
class Period:
    """A billing period: a calendar month in UTC, [start, end)."""

    start: datetime
    end: datetime

    @property
    def label(self) -> str:
        return f"{self.start.year:04d}-{self.start.month:02d}"

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()

    def share(self, since: datetime, until: datetime | None = None) -> tuple[int, int]:
        """The part of the period from `since` (clamped into it) to `until` (default: its
        end), as whole seconds over the period's: a fraction without floating point."""
        begin = min(max(since, self.start), self.end)
        finish = min(max(until or self.end, begin), self.end)
        return int((finish - begin).total_seconds()), int(self.seconds)


def period_of(moment: datetime) -> Period:
    """The calendar month (UTC) holding `moment`."""
    moment = moment.astimezone(UTC)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    end = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    return Period(start, end)


async def plan_named(session: AsyncSession, name: str) -> Plan:
    """The plan `name`; `NotFound` naming the plans there are."""
    plan = await session.get(Plan, name)
    if plan is None:
        names = list(await session.scalars(sa.select(Plan.name).order_by(Plan.name)))
        raise NotFound(f"plan {name!r} not found; the plans are {', '.join(names)}", param="plan")
    return plan


def _part(amount: int, share: tuple[int, int]) -> int:
    part, whole = share
    return amount * part // whole if whole else 0


async def charge_period_fee(
    session: AsyncSession,
    customer: Customer,
    period: Period,
    rules: BillingRules,
    changes: Changes,
) -> bool:
    """Charge the customer's plan fee for `period` once; whether it was charged now. The
    customer's row must be locked (`with_for_update`). The platform's own customer (its
    functions) pays no fee."""
    if customer.id == DEFAULT_CUSTOMER_ID:
        return False
    plan = await plan_named(session, customer.plan)
    since = customer.plan_since or customer.created_at
    amount = _part(plan.monthly_fee_micros, period.share(since))
    if amount == 0:
        return False  # a free plan (or no time left in the period): nothing to enter
    charged = await post_entry(
        session, customer, kind=LedgerKind.FEE, amount=-amount,
        external_id=f"fee:{customer.id}:{period.label}",
        description=f"{plan.title or plan.name} plan, {period.label}",
    )  # fmt: skip
    if charged:
        await refresh_block(session, customer.id, rules, changes)
    return charged


async def change_plan(
    session: AsyncSession,
    customer_id: uuid.UUID,
    plan_name: str,
    now: datetime,
    rules: BillingRules,
    changes: Changes,
) -> Customer:
    """Move the customer to `plan_name` from `now`, prorating both fees over the rest of the
    period; the customer (locked, updated). The same plan again changes nothing."""
    customer = await session.get(Customer, customer_id, with_for_update=True)
    if customer is None:
        raise NotFound(f"customer {customer_id} not found")
    new = await plan_named(session, plan_name)
    if new.name == customer.plan:
        return customer
    old = await plan_named(session, customer.plan)
    period = period_of(now)
    await charge_period_fee(session, customer, period, rules, changes)
    rest = period.share(now)
    change = uuid.uuid4().hex[:12]
    back = _part(old.monthly_fee_micros, rest)
    due = _part(new.monthly_fee_micros, rest)
    if back:
        await post_entry(
            session, customer, kind=LedgerKind.PRORATION, amount=back,
            external_id=f"proration:{customer.id}:{change}:back",
            description=f"{old.title or old.name} plan unused from {now:%Y-%m-%d %H:%M} UTC",
        )  # fmt: skip
    if due:
        await post_entry(
            session, customer, kind=LedgerKind.PRORATION, amount=-due,
            external_id=f"proration:{customer.id}:{change}:due",
            description=f"{new.title or new.name} plan from {now:%Y-%m-%d %H:%M} UTC",
        )  # fmt: skip
    customer.plan = new.name
    customer.tier = new.tier
    customer.plan_since = now
    await session.flush()
    await refresh_block(session, customer.id, rules, changes)
    return customer


async def charge_due_fees(
    session: AsyncSession, now: datetime, rules: BillingRules, changes: Changes, *, limit: int = 500
) -> int:
    """Charge this period's fee to up to `limit` customers on a paying plan who have not paid
    it yet (rows another transaction holds are left for the next sweep); how many."""
    period = period_of(now)
    label = period.label
    charged_key = sa.literal("fee:") + sa.cast(Customer.id, sa.String) + sa.literal(f":{label}")
    due = (
        sa.select(Customer)
        .join(Plan, Plan.name == Customer.plan)
        .where(
            Plan.monthly_fee_micros > 0,
            Customer.id != DEFAULT_CUSTOMER_ID,
            Customer.created_at < period.end,
            ~sa.exists().where(LedgerEntry.external_id == charged_key),
        )
        .limit(limit)
        .with_for_update(of=Customer, skip_locked=True)
    )
    count = 0
    for customer in list(await session.scalars(due)):
        count += await charge_period_fee(session, customer, period, rules, changes)
    return count

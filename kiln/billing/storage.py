"""Pods' volumes, billed per GB-hour at `KILN_VOLUME_PRICE_GB_HOUR` from the pod's creation
until it is deleted, running or stopped alike (its bytes are kept either way).

The billing service's sweep charges each volume's whole hours as they pass (price x GB x
hours: exact, nothing rounded) and, once the pod has ended, its last part of an hour, prorated
to the millisecond and rounded down. Each charge is a `storage` ledger entry with a
`storage_charges` row naming the pod, its size and the period, so invoices show GB-hours per
pod; the pod's `storage_charged_until` moves in the same transaction, and the entry's external
id (`storage:<pod>:<end>`) lets a period be charged once however sweeps race.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.billing.ledger import BillingRules, Changes, post_entry, refresh_block
from kiln.db.enums import LedgerKind
from kiln.db.models import Customer, LedgerEntry, Pod, StorageCharge

__all__ = ["charge_storage", "storage_cost", "storage_due"]

_HOUR = timedelta(hours=1)
_MS_PER_HOUR = 3_600_000


def storage_due(
    created_at: datetime, charged_until: datetime | None, ended_at: datetime | None, now: datetime
) -> tuple[datetime, datetime] | None:
    """The period of a volume to charge now: its whole hours since it was last charged, or
    all that is left once it ended; None when nothing is due."""
    start = charged_until or created_at
    if ended_at is not None and ended_at <= now:
        end = ended_at
    else:
        end = start + ((now - start) // _HOUR) * _HOUR
    return (start, end) if end > start else None


def storage_cost(price_gb_hour: int, gb: int, start: datetime, end: datetime) -> int:
    """What `gb` for [start, end) costs, rounded down to the micro-unit."""
    ms = (end - start) // timedelta(milliseconds=1)
    return price_gb_hour * gb * ms // _MS_PER_HOUR


async def charge_storage(
    session: AsyncSession, now: datetime, rules: BillingRules, changes: Changes, *, limit: int = 100
) -> int:
    """Charge the storage due on up to `limit` volumes (pods another transaction holds wait for
    the next sweep); how many volumes were charged."""
    since = sa.func.coalesce(Pod.storage_charged_until, Pod.created_at)
    due = (
        sa.select(Pod.id, Pod.customer_id)
        .where(
            Pod.volume_gb > 0,
            sa.or_(
                sa.and_(Pod.ended_at.is_(None), since <= now - _HOUR),
                since < Pod.ended_at,
            ),
        )
        .order_by(since)
        .limit(limit)
    )
    count = 0
    for pod_id, customer_id in (await session.execute(due)).all():
        # The customer's row first, then the pod's: the order every pod change locks in.
        customer = await session.get(Customer, customer_id, with_for_update=True)
        pod = await session.scalar(
            sa.select(Pod).where(Pod.id == pod_id).with_for_update(skip_locked=True)
        )
        if customer is None or pod is None:  # another sweep holds it: the next one charges
            continue
        period = storage_due(pod.created_at, pod.storage_charged_until, pod.ended_at, now)
        if period is None:
            continue
        start, end = period
        amount = storage_cost(rules.volume_price_gb_hour, pod.volume_gb, start, end)
        pod.storage_charged_until = end
        count += 1
        if amount == 0:  # storage is free here: nothing to enter
            continue
        external_id = f"storage:{pod.id}:{int(end.timestamp() * 1000)}"
        posted = await post_entry(
            session, customer, kind=LedgerKind.STORAGE, amount=-amount, external_id=external_id,
            description=f"Volume of pod {pod.name}, {pod.volume_gb} GB",
        )  # fmt: skip
        if not posted:
            continue
        entry_id = await session.scalar(
            sa.select(LedgerEntry.id).where(LedgerEntry.external_id == external_id)
        )
        assert entry_id is not None
        session.add(
            StorageCharge(
                ledger_entry_id=entry_id,
                pod_id=pod.id,
                gb=pod.volume_gb,
                period_start=start,
                period_end=end,
            )
        )
        await refresh_block(session, customer.id, rules, changes)
    return count

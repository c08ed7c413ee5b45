"""Money: usage reported by replicas and the ledger that charges and credits customers."""

from __future__ import annotations

import uuid
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from kiln.db.base import Base, CreatedAt, str_enum
from kiln.db.enums import LedgerKind

__all__ = ["LedgerEntry", "UsageEvent"]


class UsageEvent(Base):
    """One interval of replica time, as reported by the replica.

    The id is the replica id plus the replica's sequence number, so a replayed event collides
    with the primary key instead of being charged twice. Replica and function ids are kept
    without foreign keys: billing facts must be recorded even when those rows are already gone.
    """

    __tablename__ = "usage_events"

    id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    replica_id: Mapped[uuid.UUID] = mapped_column(index=True)
    customer_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("customers.id", ondelete="RESTRICT")
    )
    function_id: Mapped[uuid.UUID]
    # NULL for CPU replicas.
    gpu_type: Mapped[str | None] = mapped_column(sa.String(32))
    gpu_count: Mapped[int]
    period_start: Mapped[datetime]
    period_end: Mapped[datetime]
    duration_ms: Mapped[int]
    received_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())

    __table_args__ = (
        sa.Index(None, "customer_id", "period_start"),
        sa.Index(None, "function_id", "period_start"),
        sa.CheckConstraint("period_end >= period_start", name="period_ordered"),
        sa.CheckConstraint("duration_ms >= 0", name="duration_nonnegative"),
        sa.CheckConstraint("gpu_count >= 0", name="gpu_count_nonnegative"),
    )


class LedgerEntry(CreatedAt, Base):
    """A signed change to a customer's balance in micro-units: negative charges, positive
    credits. Unique keys make every source of money count at most once."""

    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    # RESTRICT: a customer with money history cannot be deleted, only disabled.
    customer_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("customers.id", ondelete="RESTRICT")
    )
    kind: Mapped[LedgerKind] = mapped_column(str_enum(LedgerKind, "kind"))
    amount_micros: Mapped[int] = mapped_column(sa.BigInteger)
    balance_after_micros: Mapped[int | None] = mapped_column(sa.BigInteger)
    usage_event_id: Mapped[str | None] = mapped_column(
        sa.ForeignKey("usage_events.id", ondelete="RESTRICT"), unique=True
    )
    # The payment provider's id (a Stripe event or payment intent) for credits it caused.
    external_id: Mapped[str | None] = mapped_column(sa.String(255), unique=True)
    description: Mapped[str] = mapped_column(sa.Text, default="", server_default="")

    __table_args__ = (
        sa.Index(None, "customer_id", "created_at"),
        # A usage charge without its event could be charged twice; only usage has an event.
        sa.CheckConstraint(
            "(kind = 'usage') = (usage_event_id IS NOT NULL)", name="usage_has_event"
        ),
        sa.CheckConstraint("kind <> 'usage' OR amount_micros <= 0", name="usage_is_debit"),
        sa.CheckConstraint(
            "kind NOT IN ('topup', 'refill') OR amount_micros > 0", name="topup_is_credit"
        ),
    )

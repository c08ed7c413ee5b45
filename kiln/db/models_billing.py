"""Money: usage reported by replicas and the ledger that charges and credits customers."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Mapped, mapped_column

from kiln.db.base import Base, CreatedAt, Timestamps, int_default, str_enum
from kiln.db.enums import CustomerTier, LedgerKind, OutboxKind, PaymentKind, PaymentStatus

__all__ = [
    "DailySpend",
    "LedgerEntry",
    "Payment",
    "PeriodRequests",
    "Plan",
    "StripeEvent",
    "StripeOutbox",
    "UsageEvent",
]


class PeriodRequests(Base):
    """Calls a customer made in a billing period (a calendar month, "YYYY-MM"), counted as
    their usage is charged: what a plan's included requests are measured against."""

    __tablename__ = "period_requests"

    customer_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("customers.id", ondelete="RESTRICT"), primary_key=True
    )
    period: Mapped[str] = mapped_column(sa.String(7), primary_key=True)
    requests: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")


class Plan(Timestamps, Base):
    """What a customer pays: a monthly fee, a price per request, GPU prices per hour where they
    differ from the platform's, requests included each month, and the limits of a tier
    (`KILN_TIER_LIMITS`'s, with each customer's own overrides). The tiers' names are the three
    default plans'."""

    __tablename__ = "plans"

    name: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    title: Mapped[str] = mapped_column(sa.String(200), default="", server_default="")
    # Whose limits (and prepayment rule) the plan's customers get: KILN_TIER_LIMITS's.
    tier: Mapped[CustomerTier] = mapped_column(str_enum(CustomerTier, "tier"))
    monthly_fee_micros: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    request_price_micros: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    included_requests: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    # GPU type (or "none") to micro-units per hour, where the plan's differ from the platform's.
    gpu_prices: Mapped[dict[str, Any]] = mapped_column(
        postgresql.JSONB, default=dict, server_default=sa.text("'{}'::jsonb")
    )

    __table_args__ = (
        sa.CheckConstraint("monthly_fee_micros >= 0", name="fee_nonnegative"),
        sa.CheckConstraint("request_price_micros >= 0", name="request_price_nonnegative"),
        sa.CheckConstraint("included_requests >= 0", name="included_nonnegative"),
    )


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
    calls: Mapped[int] = int_default(0)  # calls the replica took in the interval
    received_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    # What the interval was charged, by part (its ledger entry holds the sum): the replica time
    # at the plan's GPU price, and its calls past the plan's included requests at the plan's
    # request price. NULL for intervals charged before plans.
    gpu_cost_micros: Mapped[int | None] = mapped_column(sa.BigInteger)
    billed_requests: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    request_cost_micros: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")

    __table_args__ = (
        sa.Index(None, "customer_id", "period_start"),
        sa.Index(None, "function_id", "period_start"),
        sa.CheckConstraint("period_end >= period_start", name="period_ordered"),
        sa.CheckConstraint("duration_ms >= 0", name="duration_nonnegative"),
        sa.CheckConstraint("gpu_count >= 0", name="gpu_count_nonnegative"),
        sa.CheckConstraint("calls >= 0", name="calls_nonnegative"),
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
    # The invoice that bills it (NULL: not yet invoiced, or a payment, which no invoice bills).
    invoice_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("invoices.id", ondelete="RESTRICT")
    )

    __table_args__ = (
        sa.Index(None, "customer_id", "created_at"),
        sa.Index(None, "invoice_id"),
        # What a close looks for: a customer's entries no invoice has taken yet.
        sa.Index(
            "ix_ledger_entries_uninvoiced",
            "customer_id",
            postgresql_where=sa.text("invoice_id IS NULL"),
        ),
        # A usage charge without its event could be charged twice; only usage has an event.
        sa.CheckConstraint(
            "(kind = 'usage') = (usage_event_id IS NOT NULL)", name="usage_has_event"
        ),
        sa.CheckConstraint("kind <> 'usage' OR amount_micros <= 0", name="usage_is_debit"),
        sa.CheckConstraint(
            "kind NOT IN ('topup', 'refill', 'payment') OR amount_micros > 0",
            name="topup_is_credit",
        ),
    )


class DailySpend(Base):
    """What a customer's usage cost on a (UTC) day, kept beside the ledger in the same
    transaction, so the spend cap is one row's read."""

    __tablename__ = "daily_spend"

    customer_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("customers.id", ondelete="CASCADE"), primary_key=True
    )
    day: Mapped[date] = mapped_column(primary_key=True)
    spent_micros: Mapped[int] = mapped_column(sa.BigInteger)


class Payment(Timestamps, Base):
    """Money asked of Stripe: a top-up the customer pays (Checkout or a PaymentIntent) or an
    auto-refill charged off-session. The id is Kiln's, sent to Stripe as the idempotency key
    and in the metadata, so webhooks find the row whichever Stripe object they describe."""

    __tablename__ = "payments"

    id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    customer_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("customers.id", ondelete="RESTRICT"), index=True
    )
    kind: Mapped[PaymentKind] = mapped_column(str_enum(PaymentKind, "kind"))
    amount_micros: Mapped[int] = mapped_column(sa.BigInteger)
    status: Mapped[PaymentStatus] = mapped_column(
        str_enum(PaymentStatus, "status"), default=PaymentStatus.PENDING, server_default="pending"
    )
    payment_intent_id: Mapped[str | None] = mapped_column(sa.String(255), unique=True)
    checkout_session_id: Mapped[str | None] = mapped_column(sa.String(255), unique=True)
    error: Mapped[str | None] = mapped_column(sa.Text)

    __table_args__ = (sa.CheckConstraint("amount_micros > 0", name="amount_positive"),)


class StripeEvent(Base):
    """A Stripe webhook event already processed: the same event delivered again does nothing."""

    __tablename__ = "stripe_events"

    id: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    type: Mapped[str] = mapped_column(sa.String(128))
    processed_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())


class StripeOutbox(CreatedAt, Base):
    """A call Stripe must receive exactly once in effect: written in the transaction that
    decided it, sent (and retried) by the Stripe worker with `identifier` as the idempotency
    key (and as the meter event's identifier) until Stripe acknowledges it."""

    __tablename__ = "stripe_outbox"

    id: Mapped[int] = mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    kind: Mapped[OutboxKind] = mapped_column(str_enum(OutboxKind, "kind"))
    identifier: Mapped[str] = mapped_column(sa.String(255), unique=True)
    customer_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("customers.id", ondelete="RESTRICT")
    )
    payload: Mapped[dict[str, Any]]
    attempts: Mapped[int] = int_default(0)
    next_attempt_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    sent_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(sa.Text)

    __table_args__ = (
        # The worker's queue: unsent rows by when they are due.
        sa.Index(
            "ix_stripe_outbox_unsent",
            "next_attempt_at",
            postgresql_where=sa.text("sent_at IS NULL"),
        ),
    )

"""Who may call what: customers and their API keys."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from kiln.db.base import Base, CreatedAt, Timestamps, int_default, str_enum, uuid_pk
from kiln.db.enums import ApiKeyKind, CustomerStatus, CustomerTier

__all__ = ["DEFAULT_CUSTOMER_ID", "ApiKey", "Customer"]

# Owns what operator keys deploy until customers come into play; created by migration 0002.
DEFAULT_CUSTOMER_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")

KEY_HASH_BYTES = 32
PREFIX_CHARS = 24


class Customer(Timestamps, Base):
    __tablename__ = "customers"

    id: Mapped[uuid.UUID] = uuid_pk()
    name: Mapped[str] = mapped_column(sa.String(200))
    tier: Mapped[CustomerTier] = mapped_column(
        str_enum(CustomerTier, "tier"), default=CustomerTier.FREE, server_default="free"
    )
    status: Mapped[CustomerStatus] = mapped_column(
        str_enum(CustomerStatus, "status"),
        default=CustomerStatus.ACTIVE,
        server_default="active",
    )
    # Money is integer micro-units everywhere. The balance may go below zero: usage is charged
    # after the fact, so the last interval before a stop can overdraw it.
    balance_micros: Mapped[int] = mapped_column(
        sa.BigInteger, default=0, server_default=sa.text("0")
    )
    spend_cap_micros: Mapped[int | None] = mapped_column(sa.BigInteger)
    # Auto-refill tops the balance up by `refill_amount_micros` when it falls below the threshold.
    refill_threshold_micros: Mapped[int | None] = mapped_column(sa.BigInteger)
    refill_amount_micros: Mapped[int | None] = mapped_column(sa.BigInteger)
    stripe_customer_id: Mapped[str | None] = mapped_column(sa.String(255), unique=True)
    # The saved card auto-refills charge off-session.
    payment_method_id: Mapped[str | None] = mapped_column(sa.String(255))
    # How often the balance fell below the refill threshold: each crossing is charged once,
    # under the idempotency key `refill:<customer>:<crossing>`.
    refill_crossings: Mapped[int] = int_default(0)
    # Refills that failed in a row; at REFILL_MAX_FAILURES auto-refill stops until reset.
    refill_failures: Mapped[int] = int_default(0)
    # Set while the customer may not start calls: "balance" (nothing left, nothing refilling
    # it) or "spend_cap" (today's usage reached the cap). NULL when calls are allowed.
    billing_block: Mapped[str | None] = mapped_column(sa.String(16))
    # Per-customer overrides of the tier's request limits; NULL means the tier's defaults.
    limit_overrides: Mapped[dict[str, Any] | None]
    # The plan the customer pays by (its tier above is the plan's, kept beside it for the
    # routers' limits), and since when: a change within a period prorates from then.
    plan: Mapped[str] = mapped_column(
        sa.ForeignKey("plans.name", ondelete="RESTRICT"), default="free", server_default="free"
    )
    plan_since: Mapped[datetime | None]

    __table_args__ = (
        sa.CheckConstraint("spend_cap_micros >= 0", name="spend_cap_nonnegative"),
        sa.CheckConstraint(
            "(refill_threshold_micros IS NULL) = (refill_amount_micros IS NULL)",
            name="refill_complete",
        ),
        sa.CheckConstraint("refill_threshold_micros >= 0", name="refill_threshold_nonnegative"),
        sa.CheckConstraint("refill_amount_micros > 0", name="refill_amount_positive"),
        sa.CheckConstraint(
            "billing_block IN ('balance', 'spend_cap', 'invoice')", name="billing_block_known"
        ),
    )


class ApiKey(CreatedAt, Base):
    """An API key. Only a keyed hash of the secret and a short prefix to recognise it by are
    stored, so a leaked database does not leak usable keys."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = uuid_pk()
    kind: Mapped[ApiKeyKind] = mapped_column(str_enum(ApiKeyKind, "kind"))
    # NULL for operator keys, which belong to the platform rather than a customer.
    customer_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("customers.id", ondelete="CASCADE"), index=True
    )
    # CASCADE, never SET NULL: a function-scoped key whose function is gone must not quietly
    # widen into a key for the whole account.
    function_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("functions.id", ondelete="CASCADE"), index=True
    )
    key_hash: Mapped[bytes] = mapped_column(sa.LargeBinary(KEY_HASH_BYTES), unique=True)
    # Room for "kiln_acct_" and a few characters of the secret, far too little for a whole key.
    prefix: Mapped[str] = mapped_column(sa.String(PREFIX_CHARS))
    name: Mapped[str] = mapped_column(sa.String(100), default="", server_default="")
    last_used_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    __table_args__ = (
        sa.CheckConstraint(f"octet_length(key_hash) = {KEY_HASH_BYTES}", name="key_hash_length"),
        sa.CheckConstraint(
            "(kind = 'operator') = (customer_id IS NULL)", name="owner_matches_kind"
        ),
        sa.CheckConstraint(
            "(kind = 'function') = (function_id IS NOT NULL)", name="function_matches_kind"
        ),
    )

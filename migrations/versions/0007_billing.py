"""Billing: payments and their Stripe webhooks, the Stripe outbox (meter events, refills), the
daily spend behind the spend cap, auto-refill state and billing blocks on customers, and the
calls counted in each usage interval.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "stripe_events",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=128), nullable=False),
        sa.Column(
            "processed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stripe_events")),
    )
    op.create_table(
        "daily_spend",
        sa.Column("customer_id", sa.Uuid(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("spent_micros", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["customer_id"],
            ["customers.id"],
            name=op.f("fk_daily_spend_customer_id_customers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("customer_id", "day", name=op.f("pk_daily_spend")),
    )
    op.create_table(
        "payments",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("customer_id", sa.Uuid(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "topup", "refill", name="kind", native_enum=False, create_constraint=True, length=32
            ),
            nullable=False,
        ),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "pending",
                "succeeded",
                "failed",
                name="status",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            server_default="pending",
            nullable=False,
        ),
        sa.Column("payment_intent_id", sa.String(length=255), nullable=True),
        sa.Column("checkout_session_id", sa.String(length=255), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("amount_micros > 0", name=op.f("ck_payments_amount_positive")),
        sa.ForeignKeyConstraint(
            ["customer_id"],
            ["customers.id"],
            name=op.f("fk_payments_customer_id_customers"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payments")),
        sa.UniqueConstraint("checkout_session_id", name=op.f("uq_payments_checkout_session_id")),
        sa.UniqueConstraint("payment_intent_id", name=op.f("uq_payments_payment_intent_id")),
    )
    op.create_index(op.f("ix_payments_customer_id"), "payments", ["customer_id"], unique=False)
    op.create_table(
        "stripe_outbox",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "meter_event",
                "refill",
                name="kind",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("identifier", sa.String(length=255), nullable=False),
        sa.Column("customer_id", sa.Uuid(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["customer_id"],
            ["customers.id"],
            name=op.f("fk_stripe_outbox_customer_id_customers"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stripe_outbox")),
        sa.UniqueConstraint("identifier", name=op.f("uq_stripe_outbox_identifier")),
    )
    op.create_index(
        "ix_stripe_outbox_unsent",
        "stripe_outbox",
        ["next_attempt_at"],
        unique=False,
        postgresql_where=sa.text("sent_at IS NULL"),
    )
    op.add_column("customers", sa.Column("payment_method_id", sa.String(length=255), nullable=True))
    op.add_column(
        "customers",
        sa.Column("refill_crossings", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column(
        "customers",
        sa.Column("refill_failures", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column("customers", sa.Column("billing_block", sa.String(length=16), nullable=True))
    op.add_column(
        "usage_events",
        sa.Column("calls", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.create_check_constraint(
        op.f("ck_customers_billing_block_known"),
        "customers",
        "billing_block IN ('balance', 'spend_cap')",
    )
    op.create_check_constraint(
        op.f("ck_usage_events_calls_nonnegative"), "usage_events", "calls >= 0"
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_usage_events_calls_nonnegative"), "usage_events", type_="check")
    op.drop_constraint(op.f("ck_customers_billing_block_known"), "customers", type_="check")
    op.drop_column("usage_events", "calls")
    op.drop_column("customers", "billing_block")
    op.drop_column("customers", "refill_failures")
    op.drop_column("customers", "refill_crossings")
    op.drop_column("customers", "payment_method_id")
    op.drop_index(
        "ix_stripe_outbox_unsent",
        table_name="stripe_outbox",
        postgresql_where=sa.text("sent_at IS NULL"),
    )
    op.drop_table("stripe_outbox")
    op.drop_index(op.f("ix_payments_customer_id"), table_name="payments")
    op.drop_table("payments")
    op.drop_table("daily_spend")
    op.drop_table("stripe_events")

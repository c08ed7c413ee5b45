"""Plans: a monthly fee, a price per request, GPU prices and included requests, over a tier's
limits. The brief's three tiers become the three default plans (free $0, pro $500 a month,
enterprise $2,500 a month plus $0.01 a request); every customer is on the plan of its tier.
The ledger gains the kinds a plan charges: `fee` and `proration`; each usage interval records
its GPU and request charges apart, and `period_requests` counts each customer's calls per month
(what included requests are measured against).

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KINDS = ("usage", "topup", "refund", "adjustment", "refill")
_PLAN_KINDS = ("fee", "proration")
# name, title, tier, monthly fee and price per request in micro-units.
_DEFAULT_PLANS = (
    ("free", "Free", "free", 0, 0),
    ("pro", "Pro", "pro", 500_000_000, 0),
    ("enterprise", "Enterprise", "enterprise", 2_500_000_000, 10_000),
)


def _kind_check(kinds: Sequence[str]) -> None:
    op.drop_constraint(op.f("ck_ledger_entries_kind"), "ledger_entries", type_="check")
    listed = ", ".join(f"'{kind}'" for kind in kinds)
    op.create_check_constraint(
        op.f("ck_ledger_entries_kind"), "ledger_entries", f"kind IN ({listed})"
    )


def upgrade() -> None:
    plans = op.create_table(
        "plans",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("title", sa.String(length=200), server_default="", nullable=False),
        sa.Column(
            "tier",
            sa.Enum(
                "free",
                "pro",
                "enterprise",
                name="tier",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("monthly_fee_micros", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("request_price_micros", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("included_requests", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column(
            "gpu_prices",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
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
        sa.CheckConstraint("included_requests >= 0", name=op.f("ck_plans_included_nonnegative")),
        sa.CheckConstraint("monthly_fee_micros >= 0", name=op.f("ck_plans_fee_nonnegative")),
        sa.CheckConstraint(
            "request_price_micros >= 0", name=op.f("ck_plans_request_price_nonnegative")
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_plans")),
    )
    op.bulk_insert(
        plans,
        [
            {"name": name, "title": title, "tier": tier, "monthly_fee_micros": fee,
             "request_price_micros": per_request}
            for name, title, tier, fee, per_request in _DEFAULT_PLANS
        ],
    )  # fmt: skip
    op.add_column(
        "customers",
        sa.Column("plan", sa.String(length=64), server_default="free", nullable=False),
    )
    op.add_column("customers", sa.Column("plan_since", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE customers SET plan = tier")
    op.create_foreign_key(
        op.f("fk_customers_plan_plans"), "customers", "plans", ["plan"], ["name"],
        ondelete="RESTRICT",
    )  # fmt: skip
    _kind_check(_KINDS + _PLAN_KINDS)
    op.add_column("usage_events", sa.Column("gpu_cost_micros", sa.BigInteger(), nullable=True))
    op.add_column(
        "usage_events",
        sa.Column("billed_requests", sa.BigInteger(), server_default="0", nullable=False),
    )
    op.add_column(
        "usage_events",
        sa.Column("request_cost_micros", sa.BigInteger(), server_default="0", nullable=False),
    )
    op.create_table(
        "period_requests",
        sa.Column("customer_id", sa.Uuid(), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("requests", sa.BigInteger(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(
            ["customer_id"],
            ["customers.id"],
            name=op.f("fk_period_requests_customer_id_customers"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("customer_id", "period", name=op.f("pk_period_requests")),
    )


def downgrade() -> None:
    op.drop_table("period_requests")
    op.drop_column("usage_events", "request_cost_micros")
    op.drop_column("usage_events", "billed_requests")
    op.drop_column("usage_events", "gpu_cost_micros")
    # The money stays: plan entries become adjustments that say what they were.
    op.execute(
        "UPDATE ledger_entries SET kind = 'adjustment', description = 'plan ' || kind || "
        "CASE WHEN description = '' THEN '' ELSE ': ' || description END "
        "WHERE kind IN ('fee', 'proration')"
    )
    _kind_check(_KINDS)
    op.drop_constraint(op.f("fk_customers_plan_plans"), "customers", type_="foreignkey")
    op.drop_column("customers", "plan_since")
    op.drop_column("customers", "plan")
    op.drop_table("plans")

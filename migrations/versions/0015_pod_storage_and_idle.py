"""Pods, the rest: volume storage billed per GB-hour (the `storage` ledger and invoice line
kind, and what a pod's storage was charged so far), auto-stop after idle hours, container
images and requirements lists as environments, a volume parked in the store, and the failures
that stop a pod which cannot start.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LEDGER_KINDS = ("usage", "topup", "refund", "adjustment", "refill", "fee", "proration", "payment")
_LINE_KINDS = (
    "fee", "proration", "gpu", "minimum", "requests", "adjustment", "refund", "rounding"
)  # fmt: skip


def _check(table: str, name: str, column: str, values: Sequence[str]) -> None:
    op.drop_constraint(op.f(f"ck_{table}_{name}"), table, type_="check")
    listed = ", ".join(f"'{value}'" for value in values)
    op.create_check_constraint(op.f(f"ck_{table}_{name}"), table, f"{column} IN ({listed})")


def upgrade() -> None:
    op.add_column("pods", sa.Column("auto_stop_s", sa.Integer(), nullable=True))
    op.add_column("pods", sa.Column("active_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("pods", sa.Column("reminded_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "pods", sa.Column("storage_charged_until", sa.DateTime(timezone=True), nullable=True)
    )
    # Storage is billed from this upgrade on: volumes that existed before it were free then.
    op.execute("UPDATE pods SET storage_charged_until = coalesce(ended_at, now())")
    op.add_column("pods", sa.Column("image", sa.String(length=512), nullable=True))
    op.add_column(
        "pods",
        sa.Column("requirements", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
    )
    op.add_column("pods", sa.Column("volume_key", sa.Text(), nullable=True))
    op.add_column(
        "pods", sa.Column("failures", sa.Integer(), server_default=sa.text("0"), nullable=False)
    )
    op.create_check_constraint(
        op.f("ck_pods_auto_stop_positive"), "pods", "auto_stop_s IS NULL OR auto_stop_s > 0"
    )
    _check("ledger_entries", "kind", "kind", (*_LEDGER_KINDS, "storage"))
    _check("invoice_lines", "kind", "kind", (*_LINE_KINDS, "storage"))
    # An ended pod's row outlives its app (its storage charges name it); a live pod's app is
    # not deleted (the router refuses).
    op.drop_constraint(op.f("fk_pods_function_id_functions"), "pods", type_="foreignkey")
    op.alter_column("pods", "function_id", nullable=True)
    op.create_foreign_key(
        op.f("fk_pods_function_id_functions"), "pods", "functions", ["function_id"], ["id"],
        ondelete="SET NULL",
    )  # fmt: skip
    op.create_table(
        "storage_charges",
        sa.Column("ledger_entry_id", sa.BigInteger(), nullable=False),
        sa.Column("pod_id", sa.Uuid(), nullable=False),
        sa.Column("gb", sa.Integer(), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("period_end > period_start", name=op.f("ck_storage_charges_forward")),
        sa.ForeignKeyConstraint(
            ["ledger_entry_id"],
            ["ledger_entries.id"],
            name=op.f("fk_storage_charges_ledger_entry_id_ledger_entries"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["pod_id"],
            ["pods.id"],
            name=op.f("fk_storage_charges_pod_id_pods"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("ledger_entry_id", name=op.f("pk_storage_charges")),
    )
    op.create_index(op.f("ix_storage_charges_pod_id"), "storage_charges", ["pod_id"])


def downgrade() -> None:
    op.drop_table("storage_charges")
    op.execute("DELETE FROM pods WHERE function_id IS NULL")
    op.drop_constraint(op.f("fk_pods_function_id_functions"), "pods", type_="foreignkey")
    op.alter_column("pods", "function_id", nullable=False)
    op.create_foreign_key(
        op.f("fk_pods_function_id_functions"), "pods", "functions", ["function_id"], ["id"],
        ondelete="CASCADE",
    )  # fmt: skip
    # Storage charged stays charged: its entries become adjustments that say what they were.
    op.execute(
        "UPDATE ledger_entries SET kind = 'adjustment', description = 'volume storage' || "
        "CASE WHEN description = '' THEN '' ELSE ': ' || description END WHERE kind = 'storage'"
    )
    # An issued invoice's lines are guarded against change; this one is a relabelling.
    op.execute("ALTER TABLE invoice_lines DISABLE TRIGGER invoice_lines_issued")
    op.execute("UPDATE invoice_lines SET kind = 'adjustment' WHERE kind = 'storage'")
    op.execute("ALTER TABLE invoice_lines ENABLE TRIGGER invoice_lines_issued")
    _check("invoice_lines", "kind", "kind", _LINE_KINDS)
    _check("ledger_entries", "kind", "kind", _LEDGER_KINDS)
    op.drop_constraint(op.f("ck_pods_auto_stop_positive"), "pods", type_="check")
    for column in (
        "failures", "volume_key", "requirements", "image", "storage_charged_until",
        "reminded_at", "active_at", "auto_stop_s",
    ):  # fmt: skip
        op.drop_column("pods", column)

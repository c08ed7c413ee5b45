"""Pods and shells: replicas a customer reserves outside the autoscaler (`/v1/pods`,
`kiln shell`). A pod's `replica_id` is chosen before its replica starts, so a router can reach
its terminal at once.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _closed(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=32)


def upgrade() -> None:
    op.create_table(
        "pods",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("customer_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("kind", _closed("kind", "shell", "pod"), nullable=False),
        sa.Column("function_id", sa.Uuid(), nullable=False),
        sa.Column("gpu", sa.String(length=32), nullable=True),
        sa.Column(
            "state",
            _closed("state", "starting", "running", "stopped", "ended"),
            server_default="starting",
            nullable=False,
        ),
        sa.Column("replica_id", sa.Uuid(), nullable=False),
        sa.Column("node_id", sa.String(length=128), nullable=True),
        sa.Column("volume_node_id", sa.String(length=128), nullable=True),
        sa.Column("ports", postgresql.ARRAY(sa.Integer()), server_default="{}", nullable=False),
        sa.Column("volume_gb", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
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
        sa.CheckConstraint("volume_gb >= 0", name=op.f("ck_pods_volume_gb_nonnegative")),
        sa.ForeignKeyConstraint(
            ["customer_id"],
            ["customers.id"],
            name=op.f("fk_pods_customer_id_customers"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["function_id"],
            ["functions.id"],
            name=op.f("fk_pods_function_id_functions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pods")),
    )
    op.create_index(op.f("ix_pods_customer_id"), "pods", ["customer_id"])
    op.create_index(op.f("ix_pods_function_id"), "pods", ["function_id"])
    op.create_index(op.f("ix_pods_state"), "pods", ["state"])
    op.create_index(
        "ix_pods_customer_name_live", "pods", ["customer_id", "name"], unique=True,
        postgresql_where=sa.text("state <> 'ended'"),
    )  # fmt: skip


def downgrade() -> None:
    op.drop_table("pods")

"""Async jobs: the method a job calls, the replica running it, its stored body, and the state
of its completion webhook.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("calls", sa.Column("method", sa.String(length=63), nullable=True))
    op.add_column("calls", sa.Column("replica_id", sa.Uuid(), nullable=True))
    op.add_column("calls", sa.Column("body_ref", sa.Text(), nullable=True))
    op.add_column("calls", sa.Column("webhook_state", sa.String(length=32), nullable=True))
    op.add_column(
        "calls",
        sa.Column("webhook_attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column("calls", sa.Column("webhook_next_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("calls", sa.Column("webhook_error", sa.Text(), nullable=True))
    op.create_check_constraint(
        op.f("ck_calls_webhook_state"),
        "calls",
        "webhook_state IN ('pending', 'delivered', 'failed')",
    )
    op.create_index(
        op.f("ix_calls_webhook_state_webhook_next_at"),
        "calls",
        ["webhook_state", "webhook_next_at"],
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_calls_webhook_state_webhook_next_at"), table_name="calls")
    op.drop_constraint(op.f("ck_calls_webhook_state"), "calls", type_="check")
    for column in (
        "webhook_error",
        "webhook_next_at",
        "webhook_attempts",
        "webhook_state",
        "body_ref",
        "replica_id",
        "method",
    ):
        op.drop_column("calls", column)

"""The invocation log as the writer fills it: router call ids (text, not UUIDs), request ids,
class methods and execution time per row; an index for the retention sweep; one row per job
attempt (unique, so a replayed job event writes none); and the body size of async jobs.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.alter_column(
        "invocations",
        "call_id",
        type_=sa.String(length=64),
        existing_type=sa.Uuid(),
        postgresql_using="call_id::text",
    )
    op.add_column("invocations", sa.Column("request_id", sa.String(length=128), nullable=True))
    op.add_column("invocations", sa.Column("method", sa.String(length=63), nullable=True))
    op.add_column("invocations", sa.Column("execution_ms", sa.Integer(), nullable=True))
    op.create_index(op.f("ix_invocations_started_at"), "invocations", ["started_at"])
    op.create_index(
        "ix_invocations_job_attempt",
        "invocations",
        ["call_id"],
        unique=True,
        postgresql_where=sa.text("kind = 'job'"),
    )
    op.add_column(
        "calls", sa.Column("bytes_in", sa.BigInteger(), server_default=sa.text("0"), nullable=False)
    )


def downgrade() -> None:
    op.drop_column("calls", "bytes_in")
    op.drop_index("ix_invocations_job_attempt", table_name="invocations")
    op.drop_index(op.f("ix_invocations_started_at"), table_name="invocations")
    op.drop_column("invocations", "execution_ms")
    op.drop_column("invocations", "method")
    op.drop_column("invocations", "request_id")
    # Router call ids are not UUIDs: they cannot go back into a UUID column.
    op.execute("UPDATE invocations SET call_id = NULL WHERE kind <> 'job'")
    op.execute("UPDATE invocations SET call_id = split_part(call_id, ':', 1) WHERE kind = 'job'")
    op.alter_column(
        "invocations",
        "call_id",
        type_=sa.Uuid(),
        existing_type=sa.String(length=64),
        postgresql_using="call_id::uuid",
    )

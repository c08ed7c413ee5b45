"""Token counts of calls through the OpenAI-compatible routes (prompt and completion tokens), for
analytics: billing stays per GPU-second.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("invocations", sa.Column("prompt_tokens", sa.Integer(), nullable=True))
    op.add_column("invocations", sa.Column("completion_tokens", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("invocations", "completion_tokens")
    op.drop_column("invocations", "prompt_tokens")

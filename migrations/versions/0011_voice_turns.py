"""Per-turn timings of real-time voice sessions (`WS /v1/realtime`) in the invocation log: for
each answer, the end of the user's speech and the time to its transcript, first token and first
audio, and whether the user barged in.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("invocations", sa.Column("voice_turns", postgresql.JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("invocations", "voice_turns")

"""How each replica's instance was built: restored from a snapshot, baked, hooks or fallback.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("replicas", sa.Column("origin", sa.String(length=16), nullable=True))


def downgrade() -> None:
    op.drop_column("replicas", "origin")

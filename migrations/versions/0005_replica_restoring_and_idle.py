"""Replicas: a `restoring` state (a snapshot being put back) and when each went idle.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_BEFORE = ("starting", "ready", "draining", "stopped", "failed", "lost")
_AFTER = ("starting", "restoring", "ready", "draining", "stopped", "failed", "lost")


def _states(values: tuple[str, ...]) -> str:
    return "state IN ({})".format(", ".join(f"'{v}'" for v in values))


def upgrade() -> None:
    op.drop_constraint(op.f("ck_replicas_state"), "replicas", type_="check")
    op.create_check_constraint(op.f("ck_replicas_state"), "replicas", _states(_AFTER))
    op.add_column("replicas", sa.Column("idle_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("replicas", "idle_since")
    # A replica that is restoring now is starting, as far as the older schema can say.
    op.execute("UPDATE replicas SET state = 'starting' WHERE state = 'restoring'")
    op.drop_constraint(op.f("ck_replicas_state"), "replicas", type_="check")
    op.create_check_constraint(op.f("ck_replicas_state"), "replicas", _states(_BEFORE))

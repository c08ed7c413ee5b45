"""A function's deploy generation.

It increases whenever the function's current version changes, rollbacks to an older version
included. Calls carry it, and a replica of an older generation hands such calls back, so a
finished deploy (or rollback) means new calls run the code it made current.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "functions",
        sa.Column("generation", sa.Integer(), server_default=sa.text("1"), nullable=False),
    )
    op.create_check_constraint(
        op.f("ck_functions_generation_positive"), "functions", "generation >= 1"
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_functions_generation_positive"), "functions", type_="check")
    op.drop_column("functions", "generation")

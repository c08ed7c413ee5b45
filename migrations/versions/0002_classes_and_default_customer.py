"""Classes as deployable units, and the platform's default customer.

A class is deployed, scaled and billed as one unit whose methods are its entry points, so
`functions.kind` gains `class`. Apps deployed with an operator key (which belongs to no
customer) are owned by the default customer created here.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

DEFAULT_CUSTOMER_ID = "00000000-0000-4000-8000-000000000001"


def upgrade() -> None:
    op.drop_constraint(op.f("ck_functions_kind"), "functions", type_="check")
    op.create_check_constraint(
        op.f("ck_functions_kind"),
        "functions",
        "kind IN ('function', 'generator', 'websocket', 'class')",
    )
    op.execute(
        sa.text(
            "INSERT INTO customers (id, name, tier) "
            "VALUES (CAST(:id AS uuid), 'default', 'enterprise') ON CONFLICT (id) DO NOTHING"
        ).bindparams(id=DEFAULT_CUSTOMER_ID)
    )


def downgrade() -> None:
    # The older schema cannot hold classes; their rows (and what hangs off them) go with it.
    op.execute("DELETE FROM functions WHERE kind = 'class'")
    op.drop_constraint(op.f("ck_functions_kind"), "functions", type_="check")
    op.create_check_constraint(
        op.f("ck_functions_kind"),
        "functions",
        "kind IN ('function', 'generator', 'websocket')",
    )
    op.execute(
        sa.text("DELETE FROM customers WHERE id = CAST(:id AS uuid)").bindparams(
            id=DEFAULT_CUSTOMER_ID
        )
    )

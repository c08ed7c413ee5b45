"""Invoices: a period's ledger entries closed into one numbered, immutable invoice per customer.

Each invoiceable ledger entry is taken by one invoice (`ledger_entries.invoice_id`); the
invoice's lines are computed from what it took. Numbers come without gaps from the one row of
`invoice_counter`. Triggers keep a finalised invoice as it was issued: its lines cannot change,
and of the invoice itself only its payment and delivery may. The ledger gains `payment` (an
invoice paid), the Stripe outbox the invoice and its collection, and customers the `invoice`
billing block (an invoice unpaid past the grace period).

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LEDGER_KINDS = ("usage", "topup", "refund", "adjustment", "refill", "fee", "proration")
_OUTBOX_KINDS = ("meter_event", "refill")
_BLOCKS = ("balance", "spend_cap")

# A finalised invoice keeps what it was issued with; its payment and delivery may still change.
_TRIGGERS = (
    """
CREATE FUNCTION kiln_invoice_issued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF OLD.status <> 'draft' THEN
            RAISE EXCEPTION 'invoice % is final and cannot be deleted', OLD.number
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        RETURN OLD;
    END IF;
    IF OLD.status <> 'draft' AND (
        NEW.status = 'draft' OR
        (NEW.number, NEW.customer_id, NEW.period, NEW.period_start, NEW.period_end,
         NEW.plan, NEW.settlement, NEW.currency, NEW.total_micros, NEW.issued_at)
        IS DISTINCT FROM
        (OLD.number, OLD.customer_id, OLD.period, OLD.period_start, OLD.period_end,
         OLD.plan, OLD.settlement, OLD.currency, OLD.total_micros, OLD.issued_at)
    ) THEN
        RAISE EXCEPTION 'invoice % is final: only its payment and delivery can change', OLD.number
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$""",
    """CREATE TRIGGER invoices_issued BEFORE UPDATE OR DELETE ON invoices
    FOR EACH ROW EXECUTE FUNCTION kiln_invoice_issued()""",
    """
CREATE FUNCTION kiln_invoice_line_issued() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    line_invoice uuid := CASE WHEN TG_OP = 'INSERT' THEN NEW.invoice_id ELSE OLD.invoice_id END;
BEGIN
    IF (SELECT status FROM invoices WHERE id = line_invoice) <> 'draft' THEN
        RAISE EXCEPTION 'invoice lines of a final invoice cannot change'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END $$""",
    """CREATE TRIGGER invoice_lines_issued BEFORE INSERT OR UPDATE OR DELETE ON invoice_lines
    FOR EACH ROW EXECUTE FUNCTION kiln_invoice_line_issued()""",
)


def _check(table: str, name: str, column: str, values: Sequence[str]) -> None:
    op.drop_constraint(op.f(f"ck_{table}_{name}"), table, type_="check")
    listed = ", ".join(f"'{value}'" for value in values)
    op.create_check_constraint(op.f(f"ck_{table}_{name}"), table, f"{column} IN ({listed})")


def _credits(kinds: Sequence[str]) -> None:
    op.drop_constraint(op.f("ck_ledger_entries_topup_is_credit"), "ledger_entries", type_="check")
    listed = ", ".join(f"'{kind}'" for kind in kinds)
    op.create_check_constraint(
        op.f("ck_ledger_entries_topup_is_credit"),
        "ledger_entries",
        f"kind NOT IN ({listed}) OR amount_micros > 0",
    )


def upgrade() -> None:
    op.create_table(
        "invoice_counter",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("last", sa.BigInteger(), server_default="0", nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_invoice_counter_one_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoice_counter")),
    )
    op.create_table(
        "period_closes",
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column(
            "closed_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("invoices", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("period", name=op.f("pk_period_closes")),
    )
    op.create_table(
        "invoices",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("number", sa.BigInteger(), nullable=True),
        sa.Column("customer_id", sa.Uuid(), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("plan", sa.String(length=64), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "draft",
                "open",
                "paid",
                name="status",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column(
            "settlement",
            sa.Enum(
                "collect",
                "balance",
                name="settlement",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("total_micros", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("paid_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("payment_reference", sa.String(length=255), nullable=True),
        sa.Column("mailed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("mailed_to", sa.Text(), nullable=True),
        sa.Column("stripe_invoice_id", sa.String(length=255), nullable=True),
        sa.Column("payment_url", sa.Text(), nullable=True),
        sa.Column("payment_attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("payment_error", sa.Text(), nullable=True),
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
        sa.CheckConstraint(
            "(status = 'draft') = (number IS NULL)", name=op.f("ck_invoices_numbered_when_final")
        ),
        sa.CheckConstraint(
            "(status = 'paid') = (paid_at IS NOT NULL)", name=op.f("ck_invoices_paid_has_time")
        ),
        sa.ForeignKeyConstraint(
            ["customer_id"],
            ["customers.id"],
            name=op.f("fk_invoices_customer_id_customers"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoices")),
        sa.UniqueConstraint("customer_id", "period", name=op.f("uq_invoices_customer_id_period")),
        sa.UniqueConstraint("number", name=op.f("uq_invoices_number")),
        sa.UniqueConstraint("stripe_invoice_id", name=op.f("uq_invoices_stripe_invoice_id")),
    )
    op.create_index(
        op.f("ix_invoices_status_issued_at"), "invoices", ["status", "issued_at"], unique=False
    )
    op.create_table(
        "invoice_lines",
        sa.Column("invoice_id", sa.Uuid(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "fee",
                "proration",
                "gpu",
                "minimum",
                "requests",
                "adjustment",
                "refund",
                "rounding",
                name="kind",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("unit", sa.String(length=16), nullable=False),
        sa.Column("gpu_type", sa.String(length=32), nullable=True),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["invoice_id"],
            ["invoices.id"],
            name=op.f("fk_invoice_lines_invoice_id_invoices"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("invoice_id", "position", name=op.f("pk_invoice_lines")),
    )
    op.add_column("ledger_entries", sa.Column("invoice_id", sa.Uuid(), nullable=True))
    op.create_index(
        op.f("ix_ledger_entries_invoice_id"), "ledger_entries", ["invoice_id"], unique=False
    )
    op.create_index(
        "ix_ledger_entries_uninvoiced",
        "ledger_entries",
        ["customer_id"],
        unique=False,
        postgresql_where=sa.text("invoice_id IS NULL"),
    )
    op.create_foreign_key(
        op.f("fk_ledger_entries_invoice_id_invoices"),
        "ledger_entries",
        "invoices",
        ["invoice_id"],
        ["id"],
        ondelete="RESTRICT",
    )
    op.execute("INSERT INTO invoice_counter (id, last) VALUES (1, 0)")
    for statement in _TRIGGERS:
        op.execute(statement)
    _check("ledger_entries", "kind", "kind", (*_LEDGER_KINDS, "payment"))
    _credits(("topup", "refill", "payment"))
    _check("stripe_outbox", "kind", "kind", (*_OUTBOX_KINDS, "invoice", "invoice_payment"))
    _check("customers", "billing_block_known", "billing_block", (*_BLOCKS, "invoice"))


def downgrade() -> None:
    # Invoice payments stay as money received: they become adjustments that say what they were.
    op.execute(
        "UPDATE ledger_entries SET kind = 'adjustment', description = 'invoice payment' || "
        "CASE WHEN description = '' THEN '' ELSE ': ' || description END WHERE kind = 'payment'"
    )
    op.execute("UPDATE customers SET billing_block = NULL WHERE billing_block = 'invoice'")
    op.execute("DELETE FROM stripe_outbox WHERE kind IN ('invoice', 'invoice_payment')")
    _check("customers", "billing_block_known", "billing_block", _BLOCKS)
    _check("stripe_outbox", "kind", "kind", _OUTBOX_KINDS)
    _credits(("topup", "refill"))
    _check("ledger_entries", "kind", "kind", _LEDGER_KINDS)
    op.execute("DROP TRIGGER invoice_lines_issued ON invoice_lines")
    op.execute("DROP TRIGGER invoices_issued ON invoices")
    op.execute("DROP FUNCTION kiln_invoice_line_issued()")
    op.execute("DROP FUNCTION kiln_invoice_issued()")
    op.drop_constraint(
        op.f("fk_ledger_entries_invoice_id_invoices"), "ledger_entries", type_="foreignkey"
    )
    op.drop_index(
        "ix_ledger_entries_uninvoiced",
        table_name="ledger_entries",
        postgresql_where=sa.text("invoice_id IS NULL"),
    )
    op.drop_index(op.f("ix_ledger_entries_invoice_id"), table_name="ledger_entries")
    op.drop_column("ledger_entries", "invoice_id")
    op.drop_table("invoice_lines")
    op.drop_index(op.f("ix_invoices_status_issued_at"), table_name="invoices")
    op.drop_table("invoices")
    op.drop_table("period_closes")
    op.drop_table("invoice_counter")

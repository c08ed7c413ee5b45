"""Invoices: what a customer owes (or paid from their balance) for a billing period, made by
closing the period from the ledger.

Each invoiceable ledger entry belongs to one invoice at most (`ledger_entries.invoice_id`), and
an invoice's lines are computed from exactly the entries it took, so its total is their sum.
Numbers have no gaps: each comes from the one counter row, taken in the transaction that
finalises the invoice (a rolled-back close gives its number back). Once an invoice leaves
`draft` its money can no longer change: triggers refuse it (migration 0013).
"""

from __future__ import annotations

import uuid
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from kiln.db.base import Base, Timestamps, int_default, str_enum, uuid_pk
from kiln.db.enums import InvoiceLineKind, InvoiceStatus, Settlement

__all__ = ["Invoice", "InvoiceCounter", "InvoiceLine", "PeriodClose"]

# A finalised invoice keeps what it was issued with; its payment and delivery may still change.
# (Migration 0013 created these; a schema built from the models gets them too.)
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


class Invoice(Timestamps, Base):
    __tablename__ = "invoices"

    id: Mapped[uuid.UUID] = uuid_pk()
    # Gapless from 1, in the order invoices were finalised; NULL while a draft.
    number: Mapped[int | None] = mapped_column(sa.BigInteger, unique=True)
    customer_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("customers.id", ondelete="RESTRICT")
    )
    period: Mapped[str] = mapped_column(sa.String(7))  # "YYYY-MM"
    period_start: Mapped[datetime]
    period_end: Mapped[datetime]
    plan: Mapped[str] = mapped_column(sa.String(64))  # the customer's plan at the close
    status: Mapped[InvoiceStatus] = mapped_column(str_enum(InvoiceStatus, "status"))
    settlement: Mapped[Settlement] = mapped_column(str_enum(Settlement, "settlement"))
    currency: Mapped[str] = mapped_column(sa.String(3))
    # What the lines add up to: positive is owed, negative is owed to the customer.
    total_micros: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    issued_at: Mapped[datetime | None]
    paid_at: Mapped[datetime | None]
    payment_reference: Mapped[str | None] = mapped_column(sa.String(255))
    mailed_at: Mapped[datetime | None]
    mailed_to: Mapped[str | None] = mapped_column(sa.Text)
    stripe_invoice_id: Mapped[str | None] = mapped_column(sa.String(255), unique=True)
    payment_url: Mapped[str | None] = mapped_column(sa.Text)  # Stripe's page to pay it on
    payment_attempts: Mapped[int] = int_default(0)
    payment_error: Mapped[str | None] = mapped_column(sa.Text)

    __table_args__ = (
        sa.UniqueConstraint("customer_id", "period"),
        sa.Index(None, "status", "issued_at"),
        sa.CheckConstraint("(status = 'draft') = (number IS NULL)", name="numbered_when_final"),
        sa.CheckConstraint("(status = 'paid') = (paid_at IS NOT NULL)", name="paid_has_time"),
    )


class InvoiceLine(Base):
    __tablename__ = "invoice_lines"

    invoice_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("invoices.id", ondelete="RESTRICT"), primary_key=True
    )
    position: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[InvoiceLineKind] = mapped_column(str_enum(InvoiceLineKind, "kind"))
    description: Mapped[str] = mapped_column(sa.Text)
    # How much of `unit` the line is for: GPU-milliseconds for replica time ("gpu_ms"),
    # requests ("requests"), or one item ("item").
    quantity: Mapped[int] = mapped_column(sa.BigInteger)
    unit: Mapped[str] = mapped_column(sa.String(16))
    gpu_type: Mapped[str | None] = mapped_column(sa.String(32))
    amount_micros: Mapped[int] = mapped_column(sa.BigInteger)


class InvoiceCounter(Base):
    """The one row whose `last` is the latest invoice number given out."""

    __tablename__ = "invoice_counter"

    id: Mapped[int] = mapped_column(primary_key=True)
    last: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")

    __table_args__ = (sa.CheckConstraint("id = 1", name="one_row"),)


class PeriodClose(Base):
    """A period every customer's invoice was made for: the automatic close is done with it."""

    __tablename__ = "period_closes"

    period: Mapped[str] = mapped_column(sa.String(7), primary_key=True)
    closed_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    invoices: Mapped[int] = mapped_column(default=0)


def _after_create(table: sa.FromClause, statement: str) -> None:
    ddl = sa.DDL(statement.replace("%", "%%"))  # type: ignore[no-untyped-call] # DDL formats with %
    sa.event.listen(table, "after_create", ddl)


for _statement in _TRIGGERS[:2]:
    _after_create(Invoice.__table__, _statement)
for _statement in _TRIGGERS[2:]:
    _after_create(InvoiceLine.__table__, _statement)
_after_create(InvoiceCounter.__table__, "INSERT INTO invoice_counter VALUES (1, 0)")

"""An invoice in the forms people read: JSON (the API's), CSV (a spreadsheet's) and PDF (fpdf2,
for mail and records).

Amounts are exact: a line worth a fraction of a cent shows its micro-units (12.345678), so the
lines on the page add up to the total as they do in the ledger.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.billing.invoices import invoice_name
from kiln.db.enums import InvoiceStatus, Settlement
from kiln.db.models import Customer, Invoice, InvoiceLine, Plan

__all__ = ["InvoiceDocument", "load_document", "money", "quantity", "to_csv", "to_json", "to_pdf"]

_SYMBOLS = {"usd": "$", "eur": "€", "gbp": "£"}


@dataclass(frozen=True)
class InvoiceDocument:
    invoice: Invoice
    customer_name: str
    plan_title: str
    lines: list[InvoiceLine]

    @property
    def name(self) -> str:
        return invoice_name(self.invoice)


async def load_document(
    session: AsyncSession, invoice_id: uuid.UUID, *, with_lines: bool = True
) -> InvoiceDocument | None:
    """A finalised invoice with what its forms show (None: no such invoice); a listing needs
    no lines."""
    invoice = await session.get(Invoice, invoice_id)
    if invoice is None or invoice.status is InvoiceStatus.DRAFT:
        return None
    customer = await session.get(Customer, invoice.customer_id)
    plan = await session.get(Plan, invoice.plan)
    lines: Sequence[InvoiceLine] = []
    if with_lines:
        lines = (
            await session.scalars(
                sa.select(InvoiceLine)
                .where(InvoiceLine.invoice_id == invoice_id)
                .order_by(InvoiceLine.position)
            )
        ).all()
    return InvoiceDocument(
        invoice=invoice,
        customer_name=customer.name if customer is not None else str(invoice.customer_id),
        plan_title=(plan.title or plan.name) if plan is not None else invoice.plan,
        lines=list(lines),
    )


def _decimal(micros: int) -> str:
    """Micro-units as a plain decimal: 2 places for whole cents, else all 6."""
    digits = 2 if micros % 10_000 == 0 else 6
    return f"{Decimal(micros) / Decimal(1_000_000):.{digits}f}"


def money(micros: int, currency: str) -> str:
    """`2864500000, "usd"` -> "$2,864.50"; fractions of a cent in full."""
    digits = 2 if micros % 10_000 == 0 else 6
    text = f"{abs(Decimal(micros) / Decimal(1_000_000)):,.{digits}f}"
    sign = "-" if micros < 0 else ""
    symbol = _SYMBOLS.get(currency.lower())
    return f"{sign}{symbol}{text}" if symbol else f"{sign}{text} {currency.upper()}"


def quantity(line: InvoiceLine) -> str:
    if line.unit == "gpu_ms":
        return f"{Decimal(line.quantity) / 1000:,.3f} s"
    if line.unit == "requests":
        return f"{line.quantity:,}"
    if line.unit == "gb_s":
        return f"{Decimal(line.quantity) / 3600:,.2f} GB-h"
    return str(line.quantity)


def _stamp(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def to_json(document: InvoiceDocument, *, with_lines: bool = True) -> dict[str, Any]:
    invoice = document.invoice
    view: dict[str, Any] = {
        "id": str(invoice.id),
        "number": invoice.number,
        "name": document.name,
        "customer_id": str(invoice.customer_id),
        "customer_name": document.customer_name,
        "period": invoice.period,
        "period_start": _stamp(invoice.period_start),
        "period_end": _stamp(invoice.period_end),
        "plan": invoice.plan,
        "status": invoice.status.value,
        "settlement": invoice.settlement.value,
        "currency": invoice.currency,
        "total_micros": invoice.total_micros,
        "amount_due_micros": invoice.total_micros
        if invoice.status is InvoiceStatus.OPEN and invoice.total_micros > 0
        else 0,
        "issued_at": _stamp(invoice.issued_at),
        "paid_at": _stamp(invoice.paid_at),
        "payment_reference": invoice.payment_reference,
        "payment_attempts": invoice.payment_attempts,
        "payment_error": invoice.payment_error,
        "payment_url": invoice.payment_url,
        "mailed_at": _stamp(invoice.mailed_at),
        "stripe_invoice_id": invoice.stripe_invoice_id,
    }
    if with_lines:
        view["lines"] = [
            {
                "position": line.position,
                "kind": line.kind.value,
                "description": line.description,
                "quantity": line.quantity,
                "unit": line.unit,
                "gpu_type": line.gpu_type,
                "amount_micros": line.amount_micros,
            }
            for line in document.lines
        ]
    return view


_CSV_COLUMNS = ("invoice", "period", "position", "kind", "description", "quantity", "unit",
                "gpu_type", "amount", "amount_micros")  # fmt: skip


def to_csv(document: InvoiceDocument) -> str:
    """One row per line, then the total, amounts as plain decimals in the invoice's currency."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_CSV_COLUMNS)
    invoice = document.invoice
    for line in document.lines:
        writer.writerow([
            document.name, invoice.period, line.position, line.kind.value, line.description,
            line.quantity, line.unit, line.gpu_type or "",
            _decimal(line.amount_micros), line.amount_micros,
        ])  # fmt: skip
    writer.writerow([
        document.name, invoice.period, "", "total", f"Total ({invoice.currency.upper()})", "",
        "", "", _decimal(invoice.total_micros), invoice.total_micros,
    ])  # fmt: skip
    return out.getvalue()


def _latin1(text: str) -> str:
    """The PDF's built-in fonts speak Latin-1 only: other characters become '?'."""
    return text.encode("latin-1", "replace").decode("latin-1")


def to_pdf(document: InvoiceDocument, *, issuer: str = "Kiln") -> bytes:
    from fpdf import FPDF  # a PDF library is for the billing paths only

    invoice = document.invoice
    currency = invoice.currency

    def cash(micros: int) -> str:
        return _latin1(money(micros, currency).replace("€", "EUR ").replace("£", "GBP "))

    pdf = FPDF(format="A4")
    pdf.set_title(f"Invoice {document.name}")
    pdf.set_author(_latin1(issuer))
    pdf.set_creation_date(invoice.issued_at)
    pdf.add_page()
    pdf.set_font("helvetica", "B", 20)
    pdf.cell(0, 12, f"Invoice {document.name}", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("helvetica", "", 10)
    issued = invoice.issued_at.strftime("%Y-%m-%d") if invoice.issued_at else ""
    status = {
        InvoiceStatus.OPEN: "Due on receipt",
        InvoiceStatus.PAID: "Paid from the prepaid balance"
        if invoice.settlement is Settlement.BALANCE
        else "Paid",
    }.get(invoice.status, invoice.status.value)
    facts = [
        ("From", issuer),
        ("Billed to", f"{document.customer_name} ({invoice.customer_id})"),
        ("Plan", document.plan_title),
        ("Period", f"{invoice.period} ({invoice.period_start:%Y-%m-%d} to "
                   f"{invoice.period_end - timedelta(days=1):%Y-%m-%d}, UTC)"),
        ("Issued", issued),
        ("Status", status),
    ]  # fmt: skip
    for label, value in facts:
        pdf.set_font("helvetica", "B", 10)
        pdf.cell(30, 6, label)
        pdf.set_font("helvetica", "", 10)
        pdf.cell(0, 6, _latin1(value), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(6)
    with pdf.table(
        col_widths=(110, 40, 40), text_align=("LEFT", "RIGHT", "RIGHT"), line_height=7
    ) as table:
        table.row(("Description", "Quantity", "Amount"))
        for line in document.lines:
            table.row((_latin1(line.description), quantity(line), cash(line.amount_micros)))
    pdf.ln(4)
    pdf.set_font("helvetica", "B", 12)
    pdf.cell(150, 8, "Total", align="R")
    pdf.cell(40, 8, cash(invoice.total_micros), align="R", new_x="LMARGIN", new_y="NEXT")
    due = invoice.total_micros if invoice.status is InvoiceStatus.OPEN else 0
    pdf.cell(150, 8, "Amount due", align="R")
    pdf.cell(40, 8, cash(max(0, due)), align="R", new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())

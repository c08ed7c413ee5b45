"""The requests and answers of the invoice routes (`kiln.router.invoices`), declared once as
`kiln.router.bodies` and `kiln.router.views` declare the others: validation and `/openapi.json`.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import Field, StrictStr

from kiln.db.enums import InvoiceLineKind, InvoiceStatus, Settlement
from kiln.router.bodies import CustomerId
from kiln.router.validation import Body, Expect, Query, View
from kiln.router.views import Time

__all__ = [
    "CloseBody",
    "Closed",
    "InvoiceList",
    "InvoiceQuery",
    "InvoiceView",
    "InvoicesQuery",
    "PaymentBody",
    "PlanRevenue",
    "PlanRevenueQuery",
]

_PERIOD = r"^2[0-9]{3}-(0[1-9]|1[0-2])$"  # years 2000 to 2999: any real period
PeriodLabel = Annotated[
    StrictStr | None,
    Field(pattern=_PERIOD, description="A billing period: a calendar month (UTC), YYYY-MM."),
    Expect("a month as YYYY-MM (years 2000 to 2999), such as 2026-03"),
]


class InvoicesQuery(Query):
    """`GET /v1/billing/invoices`: newest first; `before` (an invoice number) pages back."""

    customer_id: CustomerId = None
    period: PeriodLabel = None
    status: Annotated[
        Literal["open", "paid"] | None, Expect("open or paid")
    ] = None  # fmt: skip
    limit: Annotated[
        int,
        Field(ge=1, le=500, description="At most this many (1 to 500)."),
        Expect("an integer from 1 to 500"),
    ] = 100
    before: Annotated[
        int | None,
        Field(ge=1, le=2**63 - 1, description="Invoices numbered below this one."),
        Expect("an invoice number, from 1"),
    ] = None


class InvoiceQuery(Query):
    """`GET /v1/billing/invoices/ID`: the invoice as JSON, or as a PDF or CSV file."""

    format: Annotated[Literal["json", "pdf", "csv"], Expect("json, pdf or csv")] = "json"


class CloseBody(Body):
    """`POST /v1/billing/close` (operators): close a period into invoices, for every customer or
    one. The period defaults to the last one that ended; the current period may be closed too
    (a final invoice: what the customer spends after it goes on the next one)."""

    period: PeriodLabel = None
    customer_id: CustomerId = None


class PaymentBody(Body):
    """`POST /v1/billing/invoices/ID/payments` (operators): the invoice was paid outside Stripe
    (a bank transfer, say)."""

    reference: Annotated[
        StrictStr,
        Field(min_length=1, max_length=255, description="What identifies the payment."),
        Expect("a payment reference: 1 to 255 characters"),
    ]


class PlanRevenueQuery(Query):
    """`GET /v1/billing/revenue/plans` (operators): invoiced revenue by plan and month."""

    since: PeriodLabel = None
    until: PeriodLabel = None
    format: Annotated[Literal["json", "csv"], Expect("json or csv")] = "json"


class InvoiceLineView(View):
    position: int
    kind: InvoiceLineKind
    description: str
    quantity: int = Field(description="How much of `unit`: gpu_ms, requests or item.")
    unit: str
    gpu_type: str | None
    amount_micros: int


class InvoiceView(View):
    id: uuid.UUID
    number: int
    name: str = Field(description="INV- and the number: what people call it.")
    customer_id: uuid.UUID
    customer_name: str
    period: str
    period_start: Time
    period_end: Time
    plan: str
    status: InvoiceStatus
    settlement: Settlement = Field(
        description="collect: to be paid; balance: already paid from the prepaid balance."
    )
    currency: str
    total_micros: int
    amount_due_micros: int
    issued_at: Time
    paid_at: Time | None
    payment_reference: str | None
    payment_attempts: int
    payment_error: str | None
    payment_url: str | None = Field(description="Stripe's page to pay the invoice on.")
    mailed_at: Time | None
    stripe_invoice_id: str | None
    lines: list[InvoiceLineView] | None = Field(
        default=None, description="In `GET /v1/billing/invoices/ID` only."
    )


class InvoiceList(View):
    invoices: list[InvoiceView]


class Closed(View):
    period: str
    created: int = Field(description="Invoices issued by this close.")
    existing: int = Field(description="Invoices issued for the period before: unchanged.")
    empty: int = Field(description="Customers with nothing to bill.")
    failed: int = Field(description="Customers whose close failed (logged); close again.")
    invoices: list[uuid.UUID] = Field(description="The ids of the invoices issued now.")


class PlanRevenue(View):
    rows: list[dict[str, object]] = Field(
        description="By period and plan: invoices, invoiced_micros, paid_micros, "
        "outstanding_micros."
    )
    mrr_micros: int = Field(description="Monthly recurring revenue: the plan fees of today's "
                            "active customers.")  # fmt: skip
    mrr_by_plan: dict[str, int]
    customers_by_plan: dict[str, int]

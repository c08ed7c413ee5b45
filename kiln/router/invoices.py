"""Invoices over HTTP: `GET /v1/billing/invoices[/ID]` (a customer's own, or any for operators;
one as JSON, `?format=pdf` or `?format=csv`), and for operators `POST /v1/billing/close` (close
a period into invoices), `POST /v1/billing/invoices/ID/payments` (a payment received outside
Stripe) and `GET /v1/billing/revenue/plans` (invoiced revenue by plan and month, and MRR)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.billing.invoice_forms import load_document, to_csv, to_json, to_pdf
from kiln.billing.invoice_worker import last_ended_period
from kiln.billing.invoices import close_period, record_payment
from kiln.billing.ledger import Changes, billing_rules
from kiln.billing.plans import Period, period_of
from kiln.billing.reports import monthly_recurring_revenue, plan_revenue_rows
from kiln.billing.reports import to_csv as rows_csv
from kiln.db.enums import ApiKeyKind, InvoiceStatus
from kiln.db.models import Customer, Invoice
from kiln.db.session import transaction
from kiln.errors import InvalidRequest, NotFound
from kiln.router.access import require_operator
from kiln.router.billing import account_for, announce, billing_principal
from kiln.router.invoice_bodies import (
    CloseBody,
    Closed,
    InvoiceList,
    InvoiceQuery,
    InvoicesQuery,
    InvoiceView,
    PaymentBody,
    PlanRevenue,
    PlanRevenueQuery,
)
from kiln.router.services import services
from kiln.router.validation import read_model, read_query
from kiln.router.views import dump

__all__ = ["close", "get_invoice", "list_invoices", "pay_invoice", "plan_revenue"]

_OPERATORS_ONLY = "closing periods and recording payments need an operator key"


def _invoice_id(request: Request) -> uuid.UUID:
    raw = request.path_params["invoice_id"]
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise NotFound(f"invoice {raw!r} not found") from None


def _period(label: str) -> Period:
    return period_of(datetime.strptime(label, "%Y-%m").replace(tzinfo=UTC))


async def list_invoices(request: Request) -> Response:
    svc = services(request)
    principal = await billing_principal(request)
    asked = read_query(request, InvoicesQuery)
    query = sa.select(Invoice.id).where(Invoice.status != InvoiceStatus.DRAFT)
    if principal.kind is not ApiKeyKind.OPERATOR or asked.customer_id is not None:
        _, customer_id = account_for(principal, asked.customer_id)
        query = query.where(Invoice.customer_id == customer_id)
    if asked.period is not None:
        query = query.where(Invoice.period == asked.period)
    if asked.status is not None:
        query = query.where(Invoice.status == InvoiceStatus(asked.status))
    if asked.before is not None:
        query = query.where(Invoice.number < asked.before)
    async with transaction(svc.sessions) as session:
        ids = list(await session.scalars(query.order_by(Invoice.number.desc()).limit(asked.limit)))
        documents = [
            await load_document(session, invoice_id, with_lines=False) for invoice_id in ids
        ]
    views = [
        InvoiceView(**to_json(document, with_lines=False))
        for document in documents
        if document is not None
    ]
    return JSONResponse(dump(InvoiceList(invoices=views)))


async def get_invoice(request: Request) -> Response:
    svc = services(request)
    principal = await billing_principal(request)
    asked = read_query(request, InvoiceQuery)
    invoice_id = _invoice_id(request)
    async with transaction(svc.sessions) as session:
        document = await load_document(session, invoice_id)
    if document is None or (
        principal.kind is not ApiKeyKind.OPERATOR
        and document.invoice.customer_id != principal.customer_id
    ):
        raise NotFound(f"invoice {str(invoice_id)!r} not found")
    filename = f"{document.name}-{document.invoice.period}"
    if asked.format == "pdf":
        # Laying out a PDF takes milliseconds of CPU: off the event loop.
        pdf = await asyncio.to_thread(to_pdf, document, issuer=svc.settings.invoice_issuer)
        return Response(
            pdf, media_type="application/pdf",
            headers={"content-disposition": f'inline; filename="{filename}.pdf"'},
        )  # fmt: skip
    if asked.format == "csv":
        return Response(
            to_csv(document), media_type="text/csv; charset=utf-8",
            headers={"content-disposition": f'attachment; filename="{filename}.csv"'},
        )  # fmt: skip
    return JSONResponse(dump(InvoiceView(**to_json(document))))


async def close(request: Request) -> Response:
    svc = services(request)
    await require_operator(request, _OPERATORS_ONLY)
    body = await read_model(request, CloseBody)
    now = datetime.now(UTC)
    if body.period is None:
        period = last_ended_period(now, timedelta(0))
    else:
        period = _period(body.period)
        if period.start > now:
            raise InvalidRequest(
                f"period {body.period!r} has not begun; close the current one "
                f"({period_of(now).label}) or an earlier one",
                param="period",
            )
    if body.customer_id is not None:
        async with transaction(svc.sessions) as session:
            if await session.get(Customer, body.customer_id) is None:
                raise NotFound(f"customer {str(body.customer_id)!r} not found")

    async def tell(changes: Changes) -> None:
        await announce(svc, changes)

    summary = await close_period(
        svc.sessions, period, billing_rules(svc.settings), customer_id=body.customer_id,
        now=now, on_changes=tell,
    )  # fmt: skip
    closed = Closed(
        period=summary.period, created=len(summary.created), existing=len(summary.existing),
        empty=summary.empty, failed=len(summary.failed), invoices=summary.created,
    )  # fmt: skip
    return JSONResponse(dump(closed))


async def pay_invoice(request: Request) -> Response:
    svc = services(request)
    await require_operator(request, _OPERATORS_ONLY)
    body = await read_model(request, PaymentBody)
    invoice_id = _invoice_id(request)
    changes = Changes()
    async with transaction(svc.sessions) as session:
        await record_payment(
            session, invoice_id, body.reference, billing_rules(svc.settings), changes,
            now=datetime.now(UTC), outside_stripe=True,
        )  # fmt: skip
    await announce(svc, changes)
    async with transaction(svc.sessions) as session:
        document = await load_document(session, invoice_id)
    assert document is not None
    return JSONResponse(dump(InvoiceView(**to_json(document))))


async def plan_revenue(request: Request) -> Response:
    svc = services(request)
    await require_operator(request, "the revenue report needs an operator key")
    asked = read_query(request, PlanRevenueQuery)
    async with transaction(svc.sessions) as session:
        rows = await plan_revenue_rows(session, since=asked.since, until=asked.until)
        mrr = await monthly_recurring_revenue(session)
    if asked.format == "csv":
        columns = ["period", "plan", "invoices", "invoiced_micros", "paid_micros",
                   "outstanding_micros"]  # fmt: skip
        return Response(rows_csv(rows, columns), media_type="text/csv; charset=utf-8")
    answer = PlanRevenue(
        rows=rows, mrr_micros=sum(fee for fee, _ in mrr.values()),
        mrr_by_plan={plan: fee for plan, (fee, _) in mrr.items()},
        customers_by_plan={plan: count for plan, (_, count) in mrr.items()},
    )  # fmt: skip
    return JSONResponse(dump(answer))

"""Billing, for a customer's owner: the plan, the balance, adding funds through Stripe
Checkout, auto-refill and the spend cap, usage by deployment and GPU type over 30 days, the
monthly invoices (each as PDF and CSV), the ledger's transactions (and their CSV), and the
prices: per hour, billed per second."""

from __future__ import annotations

import decimal
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from kiln.console.api import api
from kiln.console.charts import bars
from kiln.console.pages.page import page, refusal
from kiln.console.web import base_url, checked_form, field, render, user_of
from kiln.errors import InvalidRequest, KilnError, NotFound, PermissionDenied
from kiln.router.services import services

__all__ = ["BILLING_ROUTES", "micros_of"]

_MICROS = decimal.Decimal(1_000_000)
_FORMS = {"pdf": "application/pdf", "csv": "text/csv; charset=utf-8"}


def micros_of(raw: str, name: str) -> int | None:
    """A form's amount of money ("25", "25.50", "$25") in micro-units; None when empty."""
    text = raw.strip().lstrip("$").replace(",", "")
    if not text:
        return None
    try:
        amount = decimal.Decimal(text)
    except decimal.InvalidOperation:
        raise InvalidRequest(f"{name}: {raw.strip()!r} is not an amount such as 25.00") from None
    if not amount.is_finite() or amount < 0 or amount != amount.quantize(decimal.Decimal("0.01")):
        raise InvalidRequest(f"{name}: {raw.strip()!r} is not an amount in cents, such as 25.00")
    return int(amount * _MICROS)


async def _owner(request: Request) -> Any:
    user = await user_of(request)
    if user.customer_id is None:
        raise PermissionDenied("operators have no balance: view a customer from Customers")
    if not user.owner:
        raise PermissionDenied("only the organisation's owner sees and changes its billing")
    return user


@page
async def billing(request: Request) -> Response:
    user = await _owner(request)
    notice = error = None
    if request.query_params.get("paid"):
        notice = "Thank you: the balance grows as soon as Stripe confirms the payment."
    if request.method == "POST":
        form = await checked_form(request, user)
        try:
            if field(form, "action") == "topup":
                amount = micros_of(field(form, "amount"), "amount")
                if amount is None:
                    raise InvalidRequest("amount: say how much to add, such as 25.00")
                here = f"{base_url(request)}/console/billing"
                topup = await api(request, user, "POST", "/v1/billing/topups", {
                    "amount_micros": amount, "method": "checkout",
                    "success_url": f"{here}?paid=1", "cancel_url": here,
                })  # fmt: skip
                return render(
                    request, "leave.html", user, title="To Stripe", to=topup["checkout_url"],
                    message="Stripe's secure page takes the payment, then brings you back.",
                )  # fmt: skip
            threshold = micros_of(field(form, "refill_threshold"), "refill below")
            refill = micros_of(field(form, "refill_amount"), "refill amount")
            cap = micros_of(field(form, "spend_cap"), "daily spend cap")
            await api(request, user, "PATCH", "/v1/billing/settings", {
                "refill_threshold_micros": threshold, "refill_amount_micros": refill,
                "spend_cap_micros": cap,
            })  # fmt: skip
            notice = "Billing settings saved."
        except KilnError as exc:
            error = refusal(exc)[1]
    account = await api(request, user, "GET", "/v1/billing/balance")
    plan = await api(request, user, "GET", f"/v1/plans/{account['plan']}")
    invoices = (await api(request, user, "GET", "/v1/billing/invoices", query={"limit": "24"}))[
        "invoices"
    ]
    usage = (await api(request, user, "GET", "/v1/billing/usage", query={"granularity": "day"}))[
        "rows"
    ]
    entries = (await api(request, user, "GET", "/v1/billing/transactions", query={"limit": "50"}))[
        "transactions"
    ]
    by_function: dict[str, int] = {}
    by_gpu: dict[str, int] = {}
    for row in usage:
        by_function[row["function"]] = by_function.get(row["function"], 0) + row["cost_micros"]
        by_gpu[row["gpu_type"]] = by_gpu.get(row["gpu_type"], 0) + row["cost_micros"]
    charts = [
        bars(
            [(k, v / 1e6) for k, v in sorted(by_function.items())],
            title="Spend by deployment, 30 days",
            unit=" $",
        ),
        bars(
            [(k, v / 1e6) for k, v in sorted(by_gpu.items())],
            title="Spend by GPU type, 30 days",
            unit=" $",
        ),
    ]
    settings = services(request).settings
    prices = sorted({**settings.gpu_prices, **plan["gpu_prices"]}.items(), key=lambda item: item[1])
    return render(
        request, "billing.html", user, account=account, entries=entries, charts=charts,
        prices=prices, payments=settings.stripe_enabled, notice=notice, error=error, plan=plan,
        invoices=invoices,
    )  # fmt: skip


@page
async def invoice_file(request: Request) -> Response:
    """One invoice as its PDF or CSV, for the page's links."""
    user = await _owner(request)
    form = request.path_params["form"]
    if form not in _FORMS:
        raise NotFound(f"no invoice form {form!r}; the forms are pdf and csv")
    invoice_id = request.path_params["invoice_id"]
    content = await api(
        request, user, "GET", f"/v1/billing/invoices/{invoice_id}", query={"format": form}
    )
    return Response(
        content, media_type=_FORMS[form],
        headers={"Content-Disposition": f'attachment; filename="kiln-invoice-{invoice_id}.{form}"'},
    )  # fmt: skip


@page
async def transactions_csv(request: Request) -> Response:
    user = await _owner(request)
    entries = (await api(request, user, "GET", "/v1/billing/transactions", query={"limit": "500"}))[
        "transactions"
    ]
    lines = ["id,created_at,kind,amount,balance_after,description"]
    for e in entries:
        description = str(e["description"] or "").replace('"', '""')
        if description[:1] in ("=", "+", "-", "@"):  # a spreadsheet would run it as a formula
            description = "'" + description
        lines.append(
            f"{e['id']},{e['created_at']},{e['kind']},{e['amount_micros'] / 1e6:.6f},"
            f'{e["balance_after_micros"] / 1e6:.6f},"{description}"'
        )
    return Response(
        "\n".join(lines) + "\n",
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="kiln-transactions.csv"'},
    )


BILLING_ROUTES = [
    ("/billing", billing, ["GET", "POST"]),
    ("/billing/transactions.csv", transactions_csv, ["GET"]),
    ("/billing/invoices/{invoice_id}/{form}", invoice_file, ["GET"]),
]

"""`kiln billing invoices|close|pay|plans-revenue`: invoices, thin clients of
`/v1/billing/invoices`, `/v1/billing/close` and `/v1/billing/revenue/plans`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from kiln.cli.billing import Csv, Customer, billing_app, money
from kiln.cli.output import JsonFlag, echo_json

__all__: list[str] = []

Period = Annotated[str | None, typer.Option(help="A month, YYYY-MM.")]


def _request(method: str, path: str, **kwargs: Any) -> Any:
    from kiln.client import connect

    with connect() as api:
        return api.request(method, path, **kwargs)


def _line(invoice: dict[str, Any]) -> str:
    currency = invoice["currency"].upper()
    due = invoice["amount_due_micros"]
    state = f"due {money(due)}" if due else invoice["status"]
    return (
        f"{invoice['name']}  {invoice['period']}  {invoice['customer_name'][:24]:<24} "
        f"{invoice['plan']:<12} {money(invoice['total_micros']):>14} {currency}  {state}"
    )


@billing_app.command("invoices")
def invoices(
    invoice_id: Annotated[
        str | None, typer.Argument(help="One invoice: its lines, or its PDF or CSV.")
    ] = None,
    customer: Customer = None,
    period: Period = None,
    status: Annotated[str | None, typer.Option(help="open or paid.")] = None,
    form: Annotated[
        str, typer.Option("--format", help="One invoice as json, pdf or csv.")
    ] = "json",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the PDF or CSV here.")
    ] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """List invoices (an account's own; operators: everyone's or --customer's), or show one."""
    if invoice_id is None:
        asked = {"customer_id": customer, "period": period, "status": status, "limit": limit}
        params = {k: v for k, v in asked.items() if v is not None}
        found = _request("GET", "/v1/billing/invoices", params=params).json()["invoices"]
        if as_json:
            echo_json(found)
            return
        for invoice in found:
            typer.echo(_line(invoice))
        return
    answer = _request("GET", f"/v1/billing/invoices/{invoice_id}", params={"format": form})
    if form in ("pdf", "csv"):
        if output is not None:
            output.write_bytes(answer.content)
            typer.echo(f"wrote {output}")
        elif form == "csv":
            typer.echo(answer.text, nl=False)
        else:
            sys.stdout.buffer.write(answer.content)
        return
    invoice = answer.json()
    if as_json:
        echo_json(invoice)
        return
    typer.echo(_line(invoice))
    for line in invoice["lines"]:
        typer.echo(f"  {line['description'][:60]:<60} {money(line['amount_micros']):>14}")
    if invoice.get("payment_url"):
        typer.echo(f"pay at {invoice['payment_url']}")


@billing_app.command("close")
def close(
    period: Annotated[
        str | None, typer.Option(help="The month to close, YYYY-MM (default: the last one).")
    ] = None,
    customer: Annotated[
        str | None, typer.Option("--customer", help="Close for this customer only.")
    ] = None,
) -> None:
    """Close a billing period into invoices (operator key); running it again changes nothing."""
    body = {k: v for k, v in (("period", period), ("customer_id", customer)) if v is not None}
    closed = _request("POST", "/v1/billing/close", json=body).json()
    typer.echo(f"{closed['period']}: {closed['created']} invoices issued, {closed['existing']} "
               f"issued before, {closed['empty']} customers with nothing to bill")  # fmt: skip
    if closed["failed"]:
        typer.echo(f"{closed['failed']} customers could not be closed (see the router's log); "
                   "run the close again", err=True)  # fmt: skip
        raise typer.Exit(1)


@billing_app.command("pay")
def pay(
    invoice_id: Annotated[str, typer.Argument(help="The invoice.")],
    reference: Annotated[str, typer.Option(help="What identifies the payment (a transfer's).")],
) -> None:
    """Record that an open invoice was paid outside Stripe (operator key)."""
    paid = _request(
        "POST", f"/v1/billing/invoices/{invoice_id}/payments", json={"reference": reference}
    ).json()
    typer.echo(_line(paid))


@billing_app.command("plans-revenue")
def plans_revenue(
    since: Period = None,
    until: Period = None,
    csv: Csv = False,
) -> None:
    """Invoiced revenue by plan and month, and monthly recurring revenue (operator key)."""
    params = {k: v for k, v in (("since", since), ("until", until)) if v is not None}
    answer = _request(
        "GET", "/v1/billing/revenue/plans", params={**params, "format": "csv" if csv else "json"}
    )
    if csv:
        typer.echo(answer.text, nl=False)
        return
    report = answer.json()
    for row in report["rows"]:
        typer.echo(f"{row['period']}  {row['plan']:<12} {row['invoices']:>6} invoices "
                   f"{money(row['invoiced_micros']):>14}  paid {money(row['paid_micros']):>14}"
                   f"  owed {money(row['outstanding_micros']):>14}")  # fmt: skip
    typer.echo(f"MRR {money(report['mrr_micros'])}: " + ", ".join(
        f"{plan} {money(fee)} ({report['customers_by_plan'][plan]} customers)"
        for plan, fee in report["mrr_by_plan"].items()
    ))  # fmt: skip

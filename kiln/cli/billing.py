"""`kiln billing …`: thin clients of `/v1/billing/...`.

Amounts are typed and shown in units of the platform's currency (`12.50`); the API counts in
micro-units. An operator names the customer with `--customer`; an account key needs not.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

import typer

from kiln.cli.output import JsonFlag, echo_json

__all__ = ["Csv", "Customer", "billing_app", "money", "parse_amount"]

billing_app = typer.Typer(
    help="Balances, top-ups, usage reports, invoices and revenue.", no_args_is_help=True
)

_MICROS = Decimal(1_000_000)
Granularity = Annotated[str, typer.Option(help="hour or day.")]
Since = Annotated[str | None, typer.Option(help="ISO date or time (default 30 days ago).")]
Until = Annotated[str | None, typer.Option(help="ISO date or time (default now).")]
Csv = Annotated[bool, typer.Option("--csv", help="CSV instead of a table.")]
Customer = Annotated[
    str | None, typer.Option("--customer", help="The customer (operator keys only).")
]


def parse_amount(raw: str) -> int:
    """'12.50' → 12_500_000 micro-units; refuses what is not a plain decimal amount."""
    try:
        value = Decimal(raw.strip())
    except InvalidOperation:
        raise typer.BadParameter(f"{raw!r} is not an amount; write it like 10 or 12.50") from None
    micros = value * _MICROS
    if not value.is_finite() or micros != micros.to_integral_value():
        raise typer.BadParameter(f"{raw!r} is not an amount with at most 6 decimals")
    return int(micros)


def money(micros: int | None) -> str:
    if micros is None:
        return "-"
    return f"{Decimal(micros) / _MICROS:,.2f}"


def _call(method: str, path: str, **kwargs: Any) -> Any:
    from kiln.client import connect

    with connect() as api:
        response = api.request(method, path, **kwargs)
    if response.headers.get("content-type", "").startswith("text/csv"):
        return response.text
    return response.json() if response.content else None


def _params(customer: str | None, **more: Any) -> dict[str, Any]:
    params = {k: v for k, v in more.items() if v is not None}
    if customer is not None:
        params["customer_id"] = customer
    return params


def _rows(path: str, params: dict[str, Any], *, csv: bool) -> list[dict[str, Any]]:
    """A report's rows to print as a table; with `csv`, the CSV is printed here instead."""
    answer = _call("GET", path, params={**params, "format": "csv" if csv else "json"})
    if csv:
        typer.echo(answer, nl=False)
        return []
    rows: list[dict[str, Any]] = answer["rows"]
    return rows


def _show_account(account: dict[str, Any]) -> None:
    currency = account["currency"].upper()
    typer.echo(f"balance      {money(account['balance_micros'])} {currency}")
    typer.echo(f"spent today  {money(account['spent_today_micros'])} {currency}"
               f" (cap {money(account['spend_cap_micros'])})")  # fmt: skip
    refill = (
        f"below {money(account['refill_threshold_micros'])}, add "
        f"{money(account['refill_amount_micros'])}"
        if account["refill_threshold_micros"] is not None
        else "off"
    )
    typer.echo(f"auto-refill  {refill}; saved card: {'yes' if account['payment_method'] else 'no'}"
               f"; failures in a row: {account['refill_failures']}")  # fmt: skip
    if account["blocked"]:
        typer.echo(f"BLOCKED      new calls get 402 ({account['blocked']})")


@billing_app.command("balance")
def balance(customer: Customer = None) -> None:
    """The balance, today's spend, the spend cap and auto-refill."""
    _show_account(_call("GET", "/v1/billing/balance", params=_params(customer)))


@billing_app.command("settings")
def settings(
    customer: Customer = None,
    spend_cap: Annotated[str | None, typer.Option(help="Daily cap; 'none' removes it.")] = None,
    refill_below: Annotated[
        str | None, typer.Option(help="Auto-refill when the balance falls below this.")
    ] = None,
    refill_amount: Annotated[str | None, typer.Option(help="How much each refill adds.")] = None,
    refill_off: Annotated[bool, typer.Option("--refill-off", help="Turn auto-refill off.")] = False,
    reset_failures: Annotated[
        bool, typer.Option("--reset-failures", help="Turn a refill stopped by failures back on.")
    ] = False,
) -> None:
    """Change the spend cap and auto-refill."""
    body: dict[str, Any] = _params(customer)
    if spend_cap is not None:
        body["spend_cap_micros"] = None if spend_cap == "none" else parse_amount(spend_cap)
    if refill_off:
        body.update(refill_threshold_micros=None, refill_amount_micros=None)
    elif refill_below is not None or refill_amount is not None:
        if refill_below is None or refill_amount is None:
            raise typer.BadParameter("give --refill-below and --refill-amount together")
        body.update(refill_threshold_micros=parse_amount(refill_below),
                    refill_amount_micros=parse_amount(refill_amount))  # fmt: skip
    if reset_failures:
        body["reset_refill_failures"] = True
    _show_account(_call("PATCH", "/v1/billing/settings", json=body))


@billing_app.command("topup")
def topup(
    amount: Annotated[str, typer.Argument(help="How much to add, e.g. 25 or 12.50.")],
    customer: Customer = None,
    success_url: Annotated[str, typer.Option(help="Where Checkout returns after paying.")] = (
        "https://example.com/paid"
    ),
    cancel_url: Annotated[str, typer.Option(help="Where Checkout returns if cancelled.")] = (
        "https://example.com/cancelled"
    ),
) -> None:
    """Start a top-up: prints the Stripe Checkout page to pay on."""
    body = _params(customer, amount_micros=parse_amount(amount), method="checkout",
                   success_url=success_url, cancel_url=cancel_url)  # fmt: skip
    answer = _call("POST", "/v1/billing/topups", json=body)
    typer.echo(f"pay at {answer['checkout_url']}")
    typer.echo(f"payment {answer['payment_id']}: the balance grows once Stripe confirms it")


@billing_app.command("credit")
def credit(
    customer_id: Annotated[str, typer.Argument(help="The customer.")],
    amount: Annotated[str, typer.Argument(help="Amount; negative takes money away.")],
    reason: Annotated[str, typer.Option(help="Shown in the customer's transactions.")] = (
        "adjustment"
    ),
) -> None:
    """Adjust a customer's balance (operator key)."""
    body = {"customer_id": customer_id, "amount_micros": parse_amount(amount),
            "description": reason}  # fmt: skip
    _show_account(_call("POST", "/v1/billing/credits", json=body))


@billing_app.command("transactions")
def transactions(
    customer: Customer = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """The ledger: charges, top-ups, refills and adjustments."""
    answer = _call("GET", "/v1/billing/transactions", params=_params(customer, limit=limit))
    if as_json:
        echo_json(answer["transactions"])
        return
    for t in answer["transactions"]:
        typer.echo(f"{t['created_at'][:19]}  {t['kind']:<10} {money(t['amount_micros']):>12}  "
                   f"{money(t['balance_after_micros']):>12}  {t['description']}")  # fmt: skip


@billing_app.command("report")
def report(
    customer: Customer = None,
    by: Annotated[str, typer.Option(help="function, gpu_type, both (comma) or none.")] = (
        "function,gpu_type"
    ),
    granularity: Granularity = "day",
    since: Since = None,
    until: Until = None,
    csv: Csv = False,
) -> None:
    """Replica-seconds, calls and cost by period, function and GPU type."""
    params = _params(customer, group_by=by, granularity=granularity, since=since, until=until)
    for row in _rows("/v1/billing/usage", params, csv=csv):
        labels = "  ".join(str(row[k]) for k in ("function", "gpu_type") if k in row)
        typer.echo(f"{row['period'][:16]}  {labels:<40} {row['replica_seconds']:>12.1f} s "
                   f"{row['calls']:>8} calls {money(row['cost_micros']):>12}")  # fmt: skip


@billing_app.command("revenue")
def revenue(
    granularity: Granularity = "day",
    since: Since = None,
    until: Until = None,
    csv: Csv = False,
) -> None:
    """Revenue by tier (operator key)."""
    params = _params(None, granularity=granularity, since=since, until=until)
    for row in _rows("/v1/billing/revenue", params, csv=csv):
        typer.echo(f"{row['period'][:16]}  {row['tier']:<11} {row['customers']:>5} customers "
                   f"{row['replica_seconds']:>12.1f} s  usage {money(row['usage_revenue_micros'])}"
                   f"  paid in {money(row['payments_micros'])}")  # fmt: skip

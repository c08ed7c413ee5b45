"""`kiln customers …`, `kiln plans …` and `kiln keys …`: thin clients of `/v1/customers`,
`/v1/plans` and `/v1/keys`.

A new key is printed once, on its own line, so scripts can capture it; nothing else prints it
again (Kiln keeps only its hash).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from kiln.cli.output import JsonFlag, echo_json

__all__ = ["customers_app", "keys_app", "plans_app"]

customers_app = typer.Typer(help="Customers and their plans (operator key).", no_args_is_help=True)
plans_app = typer.Typer(
    help="Plans: monthly fees, request and GPU prices, tiers (changes: operator key).",
    no_args_is_help=True,
)
keys_app = typer.Typer(help="API keys: create, list, revoke, rotate.", no_args_is_help=True)


def _request(method: str, path: str, **kwargs: Any) -> Any:
    from kiln.client import connect

    with connect() as api:
        response = api.request(method, path, **kwargs)
    return response.json() if response.content else None


def _customer_line(c: dict[str, Any]) -> str:
    keys = f"  {c['active_keys']} keys" if "active_keys" in c else ""
    return f"{c['id']}  {c['name']:<24} {c['plan']:<12} {c['tier']:<10} {c['status']}{keys}"


@customers_app.command("create")
def customers_create(
    name: Annotated[str, typer.Argument(help="The customer's name.")],
    tier: Annotated[
        str | None, typer.Option(help="free, pro or enterprise: that tier's default plan.")
    ] = None,
    plan: Annotated[str | None, typer.Option(help="The plan (`kiln plans list`).")] = None,
) -> None:
    """Create a customer (on the free plan unless --plan or --tier says otherwise); a paying
    plan's fee for the rest of the month is charged at once."""
    body: dict[str, Any] = {"name": name}
    if plan is not None:
        body["plan"] = plan
    if tier is not None:
        body["tier"] = tier
    typer.echo(_customer_line(_request("POST", "/v1/customers", json=body)))


@customers_app.command("list")
def customers_list(as_json: JsonFlag = False) -> None:
    """List customers."""
    customers = _request("GET", "/v1/customers")["customers"]
    if as_json:
        echo_json(customers)
        return
    for customer in customers:
        typer.echo(_customer_line(customer))


@customers_app.command("show")
def customers_show(customer_id: Annotated[str, typer.Argument(help="The customer's id.")]) -> None:
    """Show one customer."""
    typer.echo(_customer_line(_request("GET", f"/v1/customers/{customer_id}")))


@customers_app.command("set-tier")
def customers_set_tier(
    customer_id: Annotated[str, typer.Argument(help="The customer's id.")],
    tier: Annotated[str, typer.Argument(help="free, pro or enterprise.")],
) -> None:
    """Move a customer to another tier."""
    body = {"tier": tier}
    typer.echo(_customer_line(_request("PATCH", f"/v1/customers/{customer_id}", json=body)))


@customers_app.command("set-plan")
def customers_set_plan(
    customer_id: Annotated[str, typer.Argument(help="The customer's id.")],
    plan: Annotated[str, typer.Argument(help="The plan (`kiln plans list`).")],
) -> None:
    """Move a customer to another plan now: the old plan's fee for the rest of the month comes
    back and the new one's is charged."""
    body = {"plan": plan}
    typer.echo(_customer_line(_request("PATCH", f"/v1/customers/{customer_id}", json=body)))


def _usd(micros: int) -> str:
    return f"{micros / 1_000_000:,.2f}"


def _plan_line(p: dict[str, Any]) -> str:
    prices = ", ".join(f"{gpu} {_usd(price)}/h" for gpu, price in p["gpu_prices"].items())
    return (
        f"{p['name']:<14} {p['tier']:<10} {_usd(p['monthly_fee_micros']):>10}/month "
        f"{_usd(p['request_price_micros']):>6}/request  {p['included_requests']:>9,} included  "
        f"{p['customers']:>5} customers{'  ' + prices if prices else ''}"
    )


def _plan_body(
    title: str | None,
    tier: str | None,
    fee: float | None,
    per_request: float | None,
    included: int | None,
    gpu_price: list[str] | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if title is not None:
        body["title"] = title
    if tier is not None:
        body["tier"] = tier
    if fee is not None:
        body["monthly_fee_micros"] = round(fee * 1_000_000)
    if per_request is not None:
        body["request_price_micros"] = round(per_request * 1_000_000)
    if included is not None:
        body["included_requests"] = included
    if gpu_price:
        prices = {}
        for item in gpu_price:
            gpu, sep, price = item.partition("=")
            try:
                prices[gpu] = round(float(price) * 1_000_000) if sep else None
            except ValueError:
                prices[gpu] = None
            if prices[gpu] is None:
                raise typer.BadParameter(
                    f"{item!r}: write GPU=USD_PER_HOUR, such as H100=3.5", param_hint="--gpu-price"
                )
        body["gpu_prices"] = prices
    return body


_Title = Annotated[str | None, typer.Option(help="What customers see.")]
_Tier = Annotated[str | None, typer.Option(help="Whose limits: free, pro or enterprise.")]
_Fee = Annotated[float | None, typer.Option("--fee", help="Monthly fee, in USD.")]
_PerRequest = Annotated[
    float | None, typer.Option("--per-request", help="Price of a request, in USD.")
]
_Included = Annotated[int | None, typer.Option(help="Requests each month without charge.")]
_GpuPrice = Annotated[
    list[str] | None, typer.Option("--gpu-price", help="GPU=USD_PER_HOUR; repeat for each.")
]


@plans_app.command("list")
def plans_list(as_json: JsonFlag = False) -> None:
    """List the plans."""
    plans = _request("GET", "/v1/plans")["plans"]
    if as_json:
        echo_json(plans)
        return
    for plan in plans:
        typer.echo(_plan_line(plan))


@plans_app.command("create")
def plans_create(
    name: Annotated[str, typer.Argument(help="Lowercase letters, digits, '-' and '_'.")],
    title: _Title = None,
    tier: _Tier = None,
    fee: _Fee = None,
    per_request: _PerRequest = None,
    included: _Included = None,
    gpu_price: _GpuPrice = None,
) -> None:
    """Create a plan."""
    body = {"name": name, **_plan_body(title, tier, fee, per_request, included, gpu_price)}
    typer.echo(_plan_line(_request("POST", "/v1/plans", json=body)))


@plans_app.command("update")
def plans_update(
    name: Annotated[str, typer.Argument(help="The plan.")],
    title: _Title = None,
    tier: _Tier = None,
    fee: _Fee = None,
    per_request: _PerRequest = None,
    included: _Included = None,
    gpu_price: _GpuPrice = None,
) -> None:
    """Change a plan: its customers pay the new prices from now on."""
    body = _plan_body(title, tier, fee, per_request, included, gpu_price)
    typer.echo(_plan_line(_request("PATCH", f"/v1/plans/{name}", json=body)))


@customers_app.command("disable")
def customers_disable(
    customer_id: Annotated[str, typer.Argument(help="The customer's id.")],
    enable: Annotated[bool, typer.Option("--enable", help="Enable it again instead.")] = False,
) -> None:
    """Disable a customer: every key of theirs is refused within two seconds."""
    body = {"status": "active" if enable else "disabled"}
    typer.echo(_customer_line(_request("PATCH", f"/v1/customers/{customer_id}", json=body)))


def _key_line(k: dict[str, Any]) -> str:
    scope = k["function"] or (k["customer_id"] or "platform")
    state = "revoked" if k["revoked_at"] else "active"
    return f"{k['id']}  {k['prefix']}…  {k['kind']:<8} {scope:<36} {state:<8} {k['name']}"


@keys_app.command("create")
def keys_create(
    customer: Annotated[
        str | None, typer.Option(help="Whose key (operator keys must say; yours by default).")
    ] = None,
    function: Annotated[
        str | None, typer.Option(help="APP/NAME: a key that may call this function only.")
    ] = None,
    operator: Annotated[bool, typer.Option("--operator", help="An operator key.")] = False,
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
) -> None:
    """Create a key and print it (this is the only time it is shown)."""
    kind = "operator" if operator else "function" if function else "account"
    body: dict[str, Any] = {"kind": kind, "name": name}
    if customer is not None:
        body["customer_id"] = customer
    if function is not None:
        body["function"] = function
    made = _request("POST", "/v1/keys", json=body)
    typer.echo(_key_line(made), err=True)
    typer.echo(made["key"])


@keys_app.command("list")
def keys_list(
    customer: Annotated[str | None, typer.Option(help="Only this customer's (operators).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """List keys (their prefixes; never the keys)."""
    params = {"customer_id": customer} if customer else {}
    keys = _request("GET", "/v1/keys", params=params)["keys"]
    if as_json:
        echo_json(keys)
        return
    for key in keys:
        typer.echo(_key_line(key))


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id.")]) -> None:
    """Revoke a key: every router refuses it within two seconds."""
    _request("DELETE", f"/v1/keys/{key_id}")
    typer.echo(f"revoked {key_id}")


@keys_app.command("rotate")
def keys_rotate(key_id: Annotated[str, typer.Argument(help="The key's id.")]) -> None:
    """Replace a key with a new one of the same scope (the old one is revoked) and print it."""
    made = _request("POST", f"/v1/keys/{key_id}/rotate")
    typer.echo(_key_line(made), err=True)
    typer.echo(made["key"])

"""`kiln customers …` and `kiln keys …`: thin clients of `/v1/customers` and `/v1/keys`.

A new key is printed once, on its own line, so scripts can capture it; nothing else prints it
again (Kiln keeps only its hash).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from kiln.cli.output import JsonFlag, echo_json

__all__ = ["customers_app", "keys_app"]

customers_app = typer.Typer(help="Customers and their tiers (operator key).", no_args_is_help=True)
keys_app = typer.Typer(help="API keys: create, list, revoke, rotate.", no_args_is_help=True)


def _request(method: str, path: str, **kwargs: Any) -> Any:
    from kiln.client import connect

    with connect() as api:
        response = api.request(method, path, **kwargs)
    return response.json() if response.content else None


def _customer_line(c: dict[str, Any]) -> str:
    keys = f"  {c['active_keys']} keys" if "active_keys" in c else ""
    return f"{c['id']}  {c['name']:<24} {c['tier']:<10} {c['status']}{keys}"


@customers_app.command("create")
def customers_create(
    name: Annotated[str, typer.Argument(help="The customer's name.")],
    tier: Annotated[str, typer.Option(help="free, pro or enterprise.")] = "free",
) -> None:
    """Create a customer."""
    typer.echo(_customer_line(_request("POST", "/v1/customers", json={"name": name, "tier": tier})))


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

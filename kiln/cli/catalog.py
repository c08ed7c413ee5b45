"""`kiln catalog …`: the model catalog, deployed in one command and called with OpenAI's
client (`GET /v1/catalog`, `POST /v1/deployments`)."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

import typer

from kiln.cli.output import JsonFlag, echo_json, echo_table

__all__ = ["catalog_app"]

catalog_app = typer.Typer(
    help="Deploy a model in one command and call it with OpenAI's client.", no_args_is_help=True
)


def _request(method: str, path: str, **kwargs: Any) -> Any:
    from kiln.client import connect

    with connect() as api:
        return api.request(method, path, **kwargs).json()


def _price(micros: int, currency: str) -> str:
    return f"{Decimal(micros) / 1_000_000:.2f} {currency}/h"


@catalog_app.command("list")
def list_entries(as_json: JsonFlag = False) -> None:
    """The entries, with the GPUs each fits on and their price per hour."""
    entries = _request("GET", "/v1/catalog")["data"]
    if as_json:
        echo_json(entries)
        return
    rows = []
    for e in entries:
        cheapest = min(e["gpus"], key=lambda g: g["price_per_hour_micros"])
        rows.append(
            (
                e["slug"],
                ", ".join(e["tasks"]),
                e["default_model"],
                ", ".join(g["gpu"] for g in e["gpus"]),
                f"from {_price(cheapest['price_per_hour_micros'], e['currency'])}",
            )
        )
    echo_table(("SLUG", "TASKS", "DEFAULT MODEL", "GPUS", "PRICE"), rows)


@catalog_app.command("deploy")
def deploy(
    slug: Annotated[str, typer.Argument(metavar="SLUG", help="The entry: chat, embeddings...")],
    name: Annotated[str, typer.Option("--name", help="The app's name: the model to call.")],
    model: Annotated[
        str | None, typer.Option("--model", help="A Hugging Face id or a model folder.")
    ] = None,
    gpu: Annotated[str | None, typer.Option("--gpu", help="A GPU type, or none.")] = None,
    min_replicas: Annotated[int | None, typer.Option("--min", help="Replicas kept up.")] = None,
    max_replicas: Annotated[int | None, typer.Option("--max", help="Most replicas.")] = None,
    idle_timeout: Annotated[
        int | None, typer.Option("--idle-timeout", help="Seconds idle before scaling down.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Deploy a catalog entry as an app; prints the base URL and model name for OpenAI's
    client."""
    body: dict[str, Any] = {"catalog": slug, "name": name}
    for key, value in (
        ("model", model), ("gpu", gpu), ("min_replicas", min_replicas),
        ("max_replicas", max_replicas), ("idle_timeout", idle_timeout),
    ):  # fmt: skip
        if value is not None:
            body[key] = value
    deployed = _request("POST", "/v1/deployments", json=body)
    if as_json:
        echo_json(deployed)
        return
    typer.echo(
        f"deployed {deployed['catalog']} as {deployed['name']} ({deployed['served_model']} on "
        f"{deployed['gpu']}, {deployed['status']})\n"
        f"  base_url: {deployed['base_url']}\n"
        f"  model:    {deployed['model']}\n\n"
        "  from openai import OpenAI\n"
        f'  client = OpenAI(base_url="{deployed["base_url"]}", api_key=YOUR_KILN_KEY)'
    )

"""`kiln logs` and `kiln calls`: a function's output and its recent calls, as its owner sees
them (`/v1/functions/APP/FN/logs` and `/calls`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from kiln.cli.output import JsonFlag, echo_json, echo_table

__all__ = ["calls", "logs"]

Target = Annotated[str, typer.Argument(help="APP/FUNCTION (a class: APP/Class)")]


def _path(target: str, what: str) -> str:
    app_name, slash, name = target.partition("/")
    if not slash or not app_name or not name or "/" in name:
        raise typer.BadParameter(f"{target!r} is not APP/FUNCTION")
    return f"/v1/functions/{app_name}/{name.partition('.')[0]}/{what}"


def logs(
    target: Target,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines as they come.")
    ] = False,
    since: Annotated[
        str, typer.Option(help="From when: a span back from now (10m, 2h, 7d) or an ISO time.")
    ] = "1h",
    request_id: Annotated[
        str | None, typer.Option("--request-id", help="Only the lines of this request.")
    ] = None,
) -> None:
    """Print what a function printed and logged: time, replica, request and stream per line."""
    from kiln.client import connect

    params = {"since": since, "follow": "true" if follow else "false"}
    if request_id is not None:
        params["request_id"] = request_id
    with connect() as api:
        for record in api.stream_items("GET", _path(target, "logs"), params=params):
            typer.echo(format_line(record))


def format_line(record: dict[str, Any]) -> str:
    """`2026-11-23 03:04:05.123  1f2e3d4c  req_ab12…  stdout  the line`."""
    moment = datetime.fromtimestamp(float(record.get("t", 0)), UTC)
    shown = moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"
    replica = str(record.get("replica", ""))[:8]
    request = str(record.get("request_id") or "-")
    return (
        f"{shown}  {replica}  {request}  {record.get('stream', '?'):<6}  {record.get('line', '')}"
    )


def calls(
    target: Target,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first.")] = 20,
    status: Annotated[
        str | None, typer.Option(help="Only succeeded, failed or cancelled calls.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """List a function's recent calls from the invocation log."""
    from kiln.client import connect

    params: dict[str, str | int] = {"limit": limit}
    if status is not None:
        params["status"] = status
    with connect() as api:
        found = api.request("GET", _path(target, "calls"), params=params).json()["calls"]
    if as_json:
        echo_json(found)
        return
    header = ("STARTED", "KIND", "STATUS", "QUEUE", "RUN", "TOTAL", "COLD", "REQUEST")
    rows = [
        (call["started_at"][:23].replace("T", " "), call["kind"],
         call["error_code"] or call["status"], _ms(call["queue_wait_ms"]),
         _ms(call["execution_ms"]), _ms(call["duration_ms"]),
         "cold" if call["cold_start"] else "", call["request_id"] or "-")
        for call in found
    ]  # fmt: skip
    echo_table(header, rows)


def _ms(value: int | None) -> str:
    return "-" if value is None else f"{value} ms"

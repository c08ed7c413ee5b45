"""Deployments: the list (status, GPU, replicas, cost per hour) and each one's page: its
endpoint and a quick start with the real URL, requests, latency percentiles, errors and cold
starts over 24 hours, live replicas and logs (Server-Sent Events), scaling applied live, and
stop. Everything is read and changed through the API as the signed-in user."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from kiln.console.api import api, api_lines
from kiln.console.charts import bars
from kiln.console.pages.page import page, refusal
from kiln.console.web import (
    base_url,
    checked_form,
    field,
    redirect,
    render,
    user_of,
    whole_numbers,
)
from kiln.errors import KilnError
from kiln.functions.gpu import gpu_request
from kiln.router.services import services

__all__ = ["DEPLOYMENT_ROUTES", "SCALING", "hourly_micros"]

# The scaling fields the deployment and catalog forms send, as the API names them.
SCALING = ("min_replicas", "max_replicas", "idle_timeout")

# How often a live replicas panel reads them again (the page itself never polls).
_REPLICAS_EVERY_S = 2.0
_SSE = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def hourly_micros(prices: dict[str, int], gpu: str, replicas: int) -> int:
    """What `replicas` replicas of a function asking for `gpu` cost an hour ("any": the
    cheapest GPU, which placement may give it)."""
    kind, count = gpu_request(gpu)
    if kind == "any":
        per = min((p for g, p in prices.items() if g != "none"), default=0)
    else:
        per = prices.get(kind, prices.get("none", 0))
    return per * count * replicas


def _target(request: Request) -> str:
    app, name = request.path_params["app"], request.path_params["name"]
    return f"{app}/{name}"


@page
async def deployments(request: Request) -> Response:
    user = await user_of(request)
    functions = (await api(request, user, "GET", "/v1/functions"))["functions"]
    prices = dict(services(request).settings.gpu_prices)
    rows = [
        {**f, "hourly": hourly_micros(prices, f["gpu"], f["replicas"]), "status": _status(f)}
        for f in functions
    ]
    return render(request, "deployments.html", user, rows=rows)


def _status(function: dict[str, Any]) -> str:
    if function["replicas"]:
        return "running"
    if function.get("last_error"):
        return "failing"
    return "scaled to zero"


@page
async def deployment(request: Request) -> Response:
    user = await user_of(request)
    target = _target(request)
    notice = error = None
    if request.method == "POST":
        form = await checked_form(request, user)
        if field(form, "action") == "stop":
            await api(request, user, "DELETE", f"/v1/apps/{request.path_params['app']}")
            return redirect("/console/deployments")
        try:
            await api(
                request, user, "PATCH", f"/v1/functions/{target}", whole_numbers(form, SCALING)
            )
            notice = "Scaling saved: it applies now."
        except KilnError as exc:
            error = refusal(exc)[1]
    function, stats, catalog = await asyncio.gather(
        api(request, user, "GET", f"/v1/functions/{target}"),
        api(request, user, "GET", f"/v1/functions/{target}/stats", query={"hours": "24"}),
        api(request, user, "GET", "/v1/deployments"),
    )
    served = next((d for d in catalog["data"] if d["name"] == function["app"]), None)
    hours = stats["by_hour"]
    charts = [
        bars([(h["hour"][11:16], h["requests"]) for h in hours], title="Requests per hour"),
        bars(
            [(h["hour"][11:16], h["p50_ms"] or 0) for h in hours], title="p50 latency", unit=" ms"
        ),
        bars(
            [(h["hour"][11:16], h["errors"]) for h in hours],
            title="Errors per hour",
            colour="#b91c1c",
        ),
        bars(
            [(h["hour"][11:16], h["cold_starts"]) for h in hours],
            title="Cold starts per hour",
            colour="#2563eb",
        ),
    ]
    return render(
        request, "deployment.html", user, f=function, target=target, stats=stats["total"],
        charts=charts, served=served, notice=notice, error=error,
        endpoint=f"{base_url(request)}/v1/run/{target}", base=base_url(request),
    )  # fmt: skip


def _event(data: dict[str, Any]) -> bytes:
    return b"data: %s\n\n" % json.dumps(data, separators=(",", ":")).encode()


@page
async def live_logs(request: Request) -> Response:
    """The function's log lines of the last 10 minutes, then new ones as they come."""
    user = await user_of(request)
    lines = api_lines(
        request,
        user,
        f"/v1/functions/{_target(request)}/logs",
        query={"since": "10m", "follow": "true"},
    )
    first = await anext(lines, None)  # a refusal (another customer's function) raises here

    async def events() -> AsyncIterator[bytes]:
        yield b": connected\n\n"
        try:
            if first is not None:
                yield _event({"append": _log_text(first)})
            async for line in lines:
                yield _event({"append": _log_text(line)})
        finally:
            await lines.aclose()

    return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE)


def _log_text(line: bytes) -> str:
    try:
        record = json.loads(line)
    except ValueError:
        return line.decode(errors="replace")
    replica = str(record.get("replica", ""))[:8]
    return f"{replica} {record.get('stream', '')}: {record.get('line', '')}"


@page
async def live_replicas(request: Request) -> Response:
    """The function's replicas, sent again whenever they change."""
    user = await user_of(request)
    path = f"/v1/functions/{_target(request)}/replicas"
    first = (await api(request, user, "GET", path))["replicas"]

    async def events() -> AsyncIterator[bytes]:
        shown = None
        replicas = first
        while True:
            summary = _replica_summary(replicas)
            if summary != shown:
                shown = summary
                yield _event(summary)
            await asyncio.sleep(_REPLICAS_EVERY_S)
            replicas = (await api(request, user, "GET", path))["replicas"]

    return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE)


def _replica_summary(replicas: list[dict[str, Any]]) -> dict[str, Any]:
    by_state: dict[str, int] = {}
    for replica in replicas:
        by_state[replica["state"]] = by_state.get(replica["state"], 0) + 1
    text = ", ".join(f"{n} {state}" for state, n in sorted(by_state.items())) or "none"
    detail = "; ".join(
        f"{r['id'][:8]} {r['state']} on {r['node']} ({r['in_flight']} in flight)" for r in replicas
    )
    return {"replicas": text, "detail": detail or "no replicas: the next call starts one"}


DEPLOYMENT_ROUTES = [
    ("/deployments", deployments, ["GET"]),
    ("/deployments/{app}/{name}", deployment, ["GET", "POST"]),
    ("/deployments/{app}/{name}/logs", live_logs, ["GET"]),
    ("/deployments/{app}/{name}/replicas", live_replicas, ["GET"]),
]

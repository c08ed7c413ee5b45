"""The dashboard: the balance with "Add funds", this month's GPU hours and spend, what the
replicas running now cost an hour and today's spend (kept current over Server-Sent Events),
the deployments, and recent activity (the ledger's newest entries)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from kiln.console.api import api
from kiln.console.pages.deployments import hourly_micros
from kiln.console.pages.page import page
from kiln.console.sessions import SignedIn
from kiln.console.web import money, redirect, render, user_of
from kiln.router.services import services

__all__ = ["HOME_ROUTES"]

_LIVE_EVERY_S = 2.0


def _running(request: Request, functions: list[dict[str, Any]], account: Any) -> dict[str, str]:
    """What the customer's replicas cost an hour now, how many run, today's spend and the
    balance, as the dashboard shows them."""
    prices = dict(services(request).settings.gpu_prices)
    hourly = sum(hourly_micros(prices, f["gpu"], f["replicas"]) for f in functions)
    currency = account["currency"]
    return {
        "hourly": money(hourly, currency),
        "replicas": str(sum(f["replicas"] for f in functions)),
        "spent_today": money(account["spent_today_micros"], currency),
        "balance": money(account["balance_micros"], currency),
    }


async def _read_running(request: Request, user: SignedIn) -> dict[str, str]:
    functions, account = await asyncio.gather(
        api(request, user, "GET", "/v1/functions"),
        api(request, user, "GET", "/v1/billing/balance"),
    )
    return _running(request, functions["functions"], account)


@page
async def dashboard(request: Request) -> Response:
    user = await user_of(request)
    if user.customer_id is None:  # an operator, viewing no customer
        return redirect("/console/operator")
    month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    account, functions, usage, entries = await asyncio.gather(
        api(request, user, "GET", "/v1/billing/balance"),
        api(request, user, "GET", "/v1/functions"),
        api(
            request,
            user,
            "GET",
            "/v1/billing/usage",
            query={
                "since": month.isoformat(),
                "granularity": "day",
                "group_by": "none",
            },
        ),
        api(request, user, "GET", "/v1/billing/transactions", query={"limit": "8"}),
    )
    running = _running(request, functions["functions"], account)
    rows = usage["rows"]
    return render(
        request, "dashboard.html", user, account=account, functions=functions["functions"],
        active=len(functions["functions"]), running=running,
        gpu_hours=sum(r["replica_seconds"] for r in rows) / 3600,
        month_spend=sum(r["cost_micros"] for r in rows), entries=entries["transactions"],
    )  # fmt: skip


@page
async def live(request: Request) -> Response:
    """The dashboard's running cost, replicas and spend, sent whenever they change."""
    user = await user_of(request)
    first = await _read_running(request, user)

    async def events() -> AsyncIterator[bytes]:
        shown, now = None, first
        while True:
            if now != shown:
                shown = now
                yield b"data: %s\n\n" % json.dumps(now).encode()
            await asyncio.sleep(_LIVE_EVERY_S)
            now = await _read_running(request, user)

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


HOME_ROUTES = [("/", dashboard, ["GET"]), ("/live", live, ["GET"])]

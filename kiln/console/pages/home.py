"""The dashboard: balance and today's spend, deployments and their replicas."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from kiln.console.api import api
from kiln.console.pages.page import page
from kiln.console.web import render, user_of

__all__ = ["HOME_ROUTES"]


@page
async def dashboard(request: Request) -> Response:
    user = await user_of(request)
    account = None if user.operator else await api(request, user, "GET", "/v1/billing/balance")
    functions = (await api(request, user, "GET", "/v1/functions"))["functions"]
    return render(
        request, "dashboard.html", user, account=account, functions=functions,
        active=len(functions), replicas=sum(f["replicas"] for f in functions),
    )  # fmt: skip


HOME_ROUTES = [("/", dashboard, ["GET"])]

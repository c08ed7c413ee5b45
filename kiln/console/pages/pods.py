"""Pods: the customer's pods and shells that have not ended, with their state, and a link that
opens each forwarded port of an active one in the browser (the console's session opens it:
kiln.router.pod_access). Read through `GET /v1/pods` as the signed-in user."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from kiln.console.api import api
from kiln.console.pages.page import page
from kiln.console.web import render, user_of
from kiln.db.enums import ACTIVE_POD_STATES

__all__ = ["POD_ROUTES"]


@page
async def pods(request: Request) -> Response:
    user = await user_of(request)
    listed = (await api(request, user, "GET", "/v1/pods"))["data"]
    active = {state.value for state in ACTIVE_POD_STATES}
    return render(request, "pods.html", user, pods=listed, active=active)


POD_ROUTES = [("/pods", pods, ["GET"])]

"""For operators: customers and their tiers (create, change the tier, disable and enable, view
a customer's own pages and act for it), the customers refused most (abuse signals), revenue by
tier over 30 days, invoiced revenue by plan and month with the monthly recurring revenue, and
the nodes with their GPUs and replicas beside each function's queue. All
through the API with operator rights (a viewed customer's pages, with that customer's)."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from kiln.console.api import api
from kiln.console.pages.page import page, refusal
from kiln.console.sessions import VIEWING_COOKIE
from kiln.console.web import checked_form, console, field, redirect, render, user_of
from kiln.db.enums import CustomerTier
from kiln.errors import KilnError, PermissionDenied

__all__ = ["OPERATOR_ROUTES"]


async def _operator(request: Request) -> Any:
    user = await user_of(request)
    if not user.operator:
        raise PermissionDenied("these pages are for the platform's operators")
    return user


async def _act(request: Request, user: Any, form: Any) -> str:
    """Do what a customers form asks; what was done, in words."""
    action, customer = field(form, "action"), field(form, "customer")
    if action == "create":
        made = await api(request, user, "POST", "/v1/customers", {
            "name": field(form, "name").strip(), "tier": field(form, "tier") or "free",
        })  # fmt: skip
        return f"Customer {made['name']} created on the {made['tier']} tier."
    if action == "tier":
        tier = field(form, "tier")
        await api(request, user, "PATCH", f"/v1/customers/{customer}", {"tier": tier})
        return f"Tier changed to {tier}."
    if action in ("disable", "enable"):
        status = "disabled" if action == "disable" else "active"
        await api(request, user, "PATCH", f"/v1/customers/{customer}", {"status": status})
        return f"Customer {status}."
    return f"unknown action {action!r}"


@page
async def customers(request: Request) -> Response:
    user = await _operator(request)
    notice = error = None
    if request.method == "POST":
        form = await checked_form(request, user)
        if field(form, "action") in ("view", "unview"):
            return _view(request, field(form, "customer"), field(form, "action") == "view")
        try:
            notice = await _act(request, user, form)
        except KilnError as exc:
            error = refusal(exc)[1]
    listed, abuse, revenue, plans = await asyncio.gather(
        api(request, user, "GET", "/v1/customers"),
        api(request, user, "GET", "/v1/abuse"),
        api(request, user, "GET", "/v1/billing/revenue", query={"granularity": "day"}),
        api(request, user, "GET", "/v1/billing/revenue/plans"),
    )
    by_tier: dict[str, dict[str, float]] = {}
    for row in revenue["rows"]:
        tier = by_tier.setdefault(row["tier"], {"revenue": 0, "payments": 0, "seconds": 0})
        tier["revenue"] += row["usage_revenue_micros"]
        tier["payments"] += row["payments_micros"]
        tier["seconds"] += row["replica_seconds"]
    names = {c["id"]: c["name"] for c in listed["customers"]}
    return render(
        request, "operator.html", user, customers=listed["customers"], abuse=abuse,
        names=names, by_tier=sorted(by_tier.items()), tiers=[t.value for t in CustomerTier],
        notice=notice, error=error, plans=plans, by_plan=plans["rows"][-12:],
    )  # fmt: skip


def _view(request: Request, customer: str, start: bool) -> Response:
    """Look at a customer's pages as the customer sees them (and act for it), or stop."""
    if not start:
        response = redirect("/console/operator")
        response.delete_cookie(VIEWING_COOKIE, path="/console")
        return response
    response = redirect("/console/")
    response.set_cookie(
        VIEWING_COOKIE, customer, httponly=True, samesite="lax",
        secure=console(request).secure_cookies, path="/console",
    )  # fmt: skip
    return response


@page
async def nodes(request: Request) -> Response:
    user = await _operator(request)
    found, queues = await asyncio.gather(
        api(request, user, "GET", "/v1/nodes"), api(request, user, "GET", "/v1/queues")
    )
    return render(request, "nodes.html", user, nodes=found["nodes"], queues=queues["queues"])


OPERATOR_ROUTES = [
    ("/operator", customers, ["GET", "POST"]),
    ("/operator/nodes", nodes, ["GET"]),
]

"""The catalog: each entry with its task, default model, the GPUs it fits with their price per
hour, and a form that deploys it (`POST /v1/deployments` as the signed-in user)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from kiln.console.api import api
from kiln.console.pages.deployments import SCALING
from kiln.console.pages.page import page, refusal
from kiln.console.web import checked_form, field, redirect, render, user_of, whole_numbers
from kiln.errors import KilnError

__all__ = ["CATALOG_ROUTES"]


def _deployment(form: Any) -> dict[str, Any]:
    """The deploy form as the API's body; empty fields take the entry's or platform's
    defaults."""
    body: dict[str, Any] = {"catalog": field(form, "catalog"), "name": field(form, "name").strip()}
    for name in ("model", "gpu"):
        if value := field(form, name).strip():
            body[name] = value
    return body | whole_numbers(form, SCALING)


@page
async def catalog(request: Request) -> Response:
    user = await user_of(request)
    error = None
    chosen = request.query_params.get("entry", "")
    if request.method == "POST":
        form = await checked_form(request, user)
        chosen = field(form, "catalog")
        try:
            await api(request, user, "POST", "/v1/deployments", _deployment(form))
            return redirect("/console/deployments")
        except KilnError as exc:
            error = refusal(exc)[1]
    entries = (await api(request, user, "GET", "/v1/catalog"))["data"]
    return render(request, "catalog.html", user, entries=entries, error=error, chosen=chosen)


CATALOG_ROUTES = [("/catalog", catalog, ["GET", "POST"])]

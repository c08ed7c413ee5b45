"""API keys: the customer's account and deployment (function-scoped) keys; create one (its
secret shown once), revoke, rotate. Everything goes through `/v1/keys` as the signed-in user."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from kiln.console.api import api
from kiln.console.pages.page import page, refusal
from kiln.console.web import checked_form, field, render, user_of
from kiln.errors import KilnError

__all__ = ["KEY_ROUTES"]


@page
async def keys(request: Request) -> Response:
    user = await user_of(request)
    error = created = None
    if request.method == "POST":
        form = await checked_form(request, user)
        action, key_id = field(form, "action"), field(form, "key")
        try:
            if action == "create":
                body: dict[str, Any] = {"name": field(form, "name").strip()}
                if function := field(form, "function").strip():
                    body |= {"kind": "function", "function": function}
                created = await api(request, user, "POST", "/v1/keys", body)
            elif action == "revoke":
                await api(request, user, "DELETE", f"/v1/keys/{key_id}")
            elif action == "rotate":
                created = await api(request, user, "POST", f"/v1/keys/{key_id}/rotate")
            else:
                error = f"unknown action {action!r}: create, revoke or rotate"
        except KilnError as exc:
            error = refusal(exc)[1]
    listed = (await api(request, user, "GET", "/v1/keys"))["keys"]
    functions = (await api(request, user, "GET", "/v1/functions"))["functions"]
    return render(
        request, "keys.html", user, keys=list(reversed(listed)), created=created, error=error,
        functions=sorted({f"{f['app']}/{f['name']}" for f in functions}),
    )  # fmt: skip


KEY_ROUTES = [("/keys", keys, ["GET", "POST"])]

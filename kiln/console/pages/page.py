"""`@page`: how every console handler answers what it does not handle itself: a page that needs
a signed-in user redirects to sign in (and back after), and a refusal is an error page with
the refusal's status and words (a 5xx, the generic words only)."""

from __future__ import annotations

import functools
import logging
import urllib.parse
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from kiln.console.web import SignInFirst, redirect, render, signed_in
from kiln.errors import KilnError, RemoteError

__all__ = ["page", "refusal"]

_log = logging.getLogger("kiln.console")

Handler = Callable[[Request], Awaitable[Response]]


def refusal(exc: KilnError) -> tuple[int, str]:
    """The status and words a page shows for `exc`."""
    if isinstance(exc, RemoteError):
        if exc.http_status >= 500:
            return exc.http_status, "something went wrong on our side; try again shortly"
        return exc.http_status, exc.api_message
    return exc.status, exc.public_message


def page(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def answer(request: Request) -> Response:
        try:
            return await handler(request)
        except SignInFirst as exc:
            return redirect("/console/login?" + urllib.parse.urlencode({"next": exc.after}))
        except KilnError as exc:
            status, message = refusal(exc)
            if status >= 500:
                _log.error("console page %s failed: %s", request.url.path, exc, exc_info=exc)
            user = await signed_in(request, optional=True)
            return render(request, "error.html", user, status=status, message=message)

    return answer

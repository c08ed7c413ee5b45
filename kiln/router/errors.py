"""The one place where exceptions become HTTP responses, in the one JSON shape of the API."""

from __future__ import annotations

import itertools
import logging
import secrets
import time

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response

from kiln.db.session import database_unreachable
from kiln.errors import InternalError, InvalidRequest, KilnError, NotFound, Unavailable

__all__ = [
    "as_kiln_error",
    "error_headers",
    "error_response",
    "handle_exception",
    "handle_http_exception",
    "request_id",
]

_log = logging.getLogger(__name__)
_SAY_UNREACHABLE_EVERY_S = 60.0
_said_unreachable = [-_SAY_UNREACHABLE_EVERY_S]  # when it was last said (monotonic)


def request_id(request: HTTPConnection) -> str:
    """The request's id: the caller's `X-Request-Id` if sane, else a new one (memoised)."""
    # In the scope, not request.state: a missing attribute there costs a raised AttributeError.
    scope = request.scope
    existing: str | None = scope.get(_SCOPE_KEY)
    if existing:
        return existing
    given = request.headers.get("x-request-id", "")
    rid = given if 0 < len(given) <= 128 and given.isascii() else _new_request_id()
    scope[_SCOPE_KEY] = rid
    return rid


_SCOPE_KEY = "kiln.request_id"
_REQUEST_ID_PREFIX = f"req_{secrets.token_hex(4)}"
_request_numbers = itertools.count(1)


def _new_request_id() -> str:
    """Unique across routers (a random prefix per process) and cheap (a counter, no urandom
    system call per request)."""
    return f"{_REQUEST_ID_PREFIX}{next(_request_numbers):08x}"


def error_headers(request: HTTPConnection, error: KilnError) -> dict[str, str]:
    headers = {"X-Request-Id": request_id(request)}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after)))
    extra = error.fields.get("headers")
    if isinstance(extra, dict):  # e.g. a 429's X-RateLimit-*
        headers.update(extra)
    return headers


def error_response(request: HTTPConnection, error: KilnError) -> Response:
    body = error.to_body(request_id(request))
    return JSONResponse(body, status_code=error.status, headers=error_headers(request, error))


async def handle_exception(request: Request, exc: Exception) -> Response:
    return error_response(request, as_kiln_error(request, exc))


def as_kiln_error(request: HTTPConnection, exc: Exception) -> KilnError:
    """The answer to an exception: itself when it is a KilnError, 503 when PostgreSQL is away,
    else a 500 that shows nothing of the bug (which is logged with the request id)."""
    if isinstance(exc, KilnError):
        return exc
    if database_unreachable(exc):  # PostgreSQL is away (a restart): the caller may retry
        now = time.monotonic()
        if now - _said_unreachable[0] > _SAY_UNREACHABLE_EVERY_S:  # not once per request
            _said_unreachable[0] = now
            _log.warning("answering 503: PostgreSQL is unreachable (%s: %s)",
                         type(exc).__name__, exc)  # fmt: skip
        return Unavailable("the database is unreachable", retry_after=1)
    # Anything else is a bug in Kiln: log it with the request id, show nothing of it.
    _log.exception("unhandled error in request %s", request_id(request), exc_info=exc)
    return InternalError(repr(exc))


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown route or method) in Kiln's shape."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error: KilnError = NotFound(f"no route {request.method} {request.url.path}")
    elif exc.status_code == 405:
        error = InvalidRequest(f"{request.url.path} does not accept {request.method}")
        return JSONResponse(
            error.to_body(request_id(request)), status_code=405, headers=exc.headers
        )
    else:
        error = InvalidRequest(str(exc.detail))
    return error_response(request, error)

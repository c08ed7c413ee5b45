"""Errors on the OpenAI-compatible routes, in OpenAI's body rather than Kiln's:
`{"error": {"message", "type", "param", "code"}}`, so that OpenAI's clients raise their usual
exceptions (`openai.NotFoundError` for an unknown model, with `param` set).

The status and the message are Kiln's own (`kiln.errors`); the `type` follows the status as
OpenAI's does, `code` is Kiln's stable code and `param` the request field at fault, when one is.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.errors import KilnError
from kiln.router.errors import as_kiln_error, error_headers
from kiln.router.streams import CallAbandoned

__all__ = ["openai_body", "openai_errors", "sse_error"]

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "invalid_request_error",
    408: "timeout_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_body(error: KilnError) -> dict[str, Any]:
    param = error.fields.get("param")
    return {
        "error": {
            "message": error.public_message,
            "type": _TYPES.get(error.status, "server_error"),
            "param": param if isinstance(param, str) else None,
            "code": error.code,
        }
    }


def sse_error(error: KilnError) -> bytes:
    """An error after a stream began: one `data:` event with the error body (then `[DONE]`)."""
    return b"data: %s\n\n" % json.dumps(openai_body(error), separators=(",", ":")).encode()


Handler = Callable[[Request], Awaitable[Response]]


def openai_errors(handler: Handler) -> Handler:
    """Answer what `handler` raises in OpenAI's error body."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except CallAbandoned:  # the client left: no one reads the answer
            return Response(status_code=499)
        except Exception as exc:  # noqa: BLE001 - every error gets OpenAI's shape here
            error = as_kiln_error(request, exc)
            return JSONResponse(
                openai_body(error), status_code=error.status, headers=error_headers(request, error)
            )

    return wrapped

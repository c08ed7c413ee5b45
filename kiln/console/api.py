"""The platform's own JSON API, called in-process as a console user: the router's handlers
run on a request scope that carries the user's principal (`SCOPE_CONSOLE`), so a console page
sees and changes exactly what an account key of the user's customer would (an operator's,
what an operator key would), refusals included, with one set of rules for both."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.parse
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import HTTPConnection, Request
from starlette.types import Message

from kiln.console.sessions import SignedIn
from kiln.db.enums import ApiKeyKind
from kiln.errors import RemoteError
from kiln.router.auth import SCOPE_CONSOLE, Principal
from kiln.router.services import services

__all__ = ["api", "api_lines", "principal_of"]

# How many chunks of a streamed answer wait for the page before the handler waits instead.
_STREAM_BUFFER = 64


def principal_of(request: HTTPConnection, user: SignedIn) -> Principal:
    """The API principal a console user acts as: an account key of their customer (for an
    operator viewing a customer, of that customer), or an operator key."""
    if user.customer_id is None:
        return Principal(user.session_id, ApiKeyKind.OPERATOR, None, None)
    return services(request).auth.principal_for(
        user.session_id, ApiKeyKind.ACCOUNT, user.customer_id, None, user.tier,
        user.limit_overrides,
    )  # fmt: skip


def _scope(
    request: Request, user: SignedIn, method: str, path: str, body: bytes, query: dict[str, str]
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": request.url.scheme,
        "server": request.scope.get("server"),
        "client": request.scope.get("client"),
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": urllib.parse.urlencode(query).encode(),
        "headers": [
            (b"host", request.headers.get("host", "localhost").encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "app": request.app,
        "state": request.scope.get("state", {}),
        SCOPE_CONSOLE: principal_of(request, user),
    }


def _receiver(body: bytes, gone: asyncio.Event) -> Any:
    """The request body once, then nothing until `gone` (the page left): a streamed answer
    runs until then."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive


def _refusal(status: int, raw: bytes) -> RemoteError:
    try:
        error = json.loads(raw or b"{}").get("error", {})
    except ValueError:
        error = {}
    return RemoteError(
        status=status,
        code=str(error.get("code", "error")),
        message=str(error.get("message", "the request failed")),
    )


async def api(
    request: Request,
    user: SignedIn,
    method: str,
    path: str,
    body: Any = None,
    *,
    query: dict[str, str] | None = None,
) -> Any:
    """Call the API as `user`; the decoded JSON answer (None for an empty one; the bytes of
    one that is not JSON, such as CSV). A refusal is raised as the handler raised it (a
    `KilnError`), or as a `RemoteError` when the handler answered it itself."""
    encoded = b"" if body is None else json.dumps(body).encode()
    status = 500
    json_answer = True
    chunks: list[bytes] = []

    async def send(message: Message) -> None:
        nonlocal status, json_answer
        if message["type"] == "http.response.start":
            status = message["status"]
            for name, value in message.get("headers", []):
                if name.lower() == b"content-type":
                    json_answer = value.startswith(b"application/json")
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    scope = _scope(request, user, method, path, encoded, query or {})
    await request.app.router(scope, _receiver(encoded, asyncio.Event()), send)
    raw = b"".join(chunks)
    if status >= 400:
        raise _refusal(status, raw)
    if not json_answer:
        return raw
    return json.loads(raw) if raw else None


async def api_lines(
    request: Request, user: SignedIn, path: str, *, query: dict[str, str] | None = None
) -> AsyncGenerator[bytes, None]:
    """GET a streamed answer (newline-delimited) as `user`, line by line as it comes, until
    it ends or the caller stops iterating (the handler is then told the client left)."""
    gone = asyncio.Event()
    lines: asyncio.Queue[bytes | None] = asyncio.Queue(_STREAM_BUFFER)
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    first: list[bytes] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            started.set_result(message["status"])
        elif message["type"] == "http.response.body":
            if started.result() >= 400:
                first.append(message.get("body", b""))
            elif message.get("body"):
                await lines.put(message["body"])

    async def run() -> None:
        try:
            await request.app.router(scope, _receiver(b"", gone), send)
        finally:
            if not started.done():
                started.set_result(500)
            await lines.put(None)

    scope = _scope(request, user, "GET", path, b"", query or {})
    handler = asyncio.create_task(run(), name=f"console-api {path}")
    try:
        status = await asyncio.shield(started)
        if status >= 400:
            await handler  # raises what the handler raised, if it raised
            raise _refusal(status, b"".join(first))
        pending = b""
        while (chunk := await lines.get()) is not None:
            *whole, pending = (pending + chunk).split(b"\n")
            for line in whole:
                if line:
                    yield line
        await handler
    finally:
        gone.set()
        if not handler.done():
            handler.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(handler, timeout=5)

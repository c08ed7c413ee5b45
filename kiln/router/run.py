"""`POST /v1/run/APP/NAME`: a synchronous call of a function or a class method, or a
generator's results streamed (`kiln.router.stream_response`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from kiln.db.enums import InvocationKind
from kiln.errors import (
    InvalidJson,
    InvalidRequest,
    KilnError,
    NotFound,
    PermissionDenied,
)
from kiln.functions.spec import CallKind, CallSpec, UnitKind
from kiln.router.auth import Principal
from kiln.router.call_log import CallWatch
from kiln.router.call_order import CallOrder
from kiln.router.catalog import FunctionRoute
from kiln.router.errors import request_id
from kiln.router.services import RouterServices, services
from kiln.router.stream_response import stream_response
from kiln.router.streams import CallAbandoned
from kiln.router.validation import read_body, storable_text

__all__ = [
    "abandoned_if_gone",
    "call_slot",
    "read_body",
    "resolve_entry",
    "run",
    "watch_disconnect",
]

JSON = "application/json"
BYTES = "application/octet-stream"
# Content types that clients send for JSON without saying so (curl -d sends form encoding).
_MAYBE_JSON = ("", "application/x-www-form-urlencoded", "text/plain")


_WATCH_AFTER_S = 0.05


class DisconnectWatch:
    """Calls `on_gone` if the client disconnects while the call runs."""

    def __init__(self, request: Request, on_gone: Callable[[], None]) -> None:
        self.request = request
        self.on_gone = on_gone
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._watch())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _watch(self) -> None:
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                self.on_gone()
                return


def watch_disconnect(request: Request) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def watch(on_gone: Callable[[], None]) -> Callable[[], None]:
        watcher = DisconnectWatch(request, on_gone)
        watcher.start()
        return watcher.stop

    return watch


@contextlib.contextmanager
def abandoned_if_gone(request: Request, call: asyncio.Future[Any]) -> Iterator[None]:
    """While inside, a client that disconnects fails `call` with `CallAbandoned`: its caller
    stops waiting, and the dispatcher has the replica stop the call. The body is read, so the
    next message from the client can only be its disconnect; most calls finish before it would
    matter, so the watch starts only after a moment."""

    def gone() -> None:
        if not call.done():
            call.set_exception(CallAbandoned())

    disconnect = DisconnectWatch(request, gone)
    timer = asyncio.get_running_loop().call_later(_WATCH_AFTER_S, disconnect.start)
    try:
        yield
    finally:
        timer.cancel()
        disconnect.stop()


def classify(body: bytes, content_type: str) -> tuple[bytes, str]:
    """Decide whether the body is JSON arguments or raw bytes for a one-parameter function."""
    media = content_type.split(";")[0].strip().lower()
    if not body:
        return b"{}", JSON
    is_json = media == JSON or media.endswith("+json")
    if is_json or media in _MAYBE_JSON:
        try:
            json.loads(body)
        except ValueError as exc:
            if is_json:
                raise InvalidJson(f"the body is not valid JSON: {exc}") from None
            return body, BYTES
        return body, JSON
    return body, BYTES


async def run(request: Request) -> Response:
    started = asyncio.get_running_loop().time()
    svc = services(request)
    principal = await svc.auth.authenticate(request, count=False)  # counted with its slot
    app = request.path_params["app"]
    route, entry, method = await resolve_entry(svc, principal, app, request.path_params["name"])
    if entry.kind is CallKind.WEBSOCKET:
        raise InvalidRequest(
            f"{app}/{request.path_params['name']} is a WebSocket handler; open a WebSocket to "
            f"/v1/ws/{app}/{request.path_params['name']} instead"
        )
    raw = await read_body(request, svc.settings.max_request_bytes)
    body, content_type = classify(raw, request.headers.get("content-type", ""))
    rid = request_id(request)
    streaming = entry.kind is CallKind.GENERATOR
    watch = CallWatch(
        svc, principal, route, method, InvocationKind.STREAM if streaming else InvocationKind.SYNC,
        rid, len(raw), started_loop=started,
    )  # fmt: skip
    order = CallOrder(
        route.function_id, content_type, method or None, route.timeout_s,
        route.startup_timeout_s, rid, route.generation, watch.trace,
    )  # fmt: skip
    # One of the customer's in-flight slots, from here until the answer is sent (a stream's
    # when its last chunk is); held at most as long as the call may last.
    slot = contextlib.AsyncExitStack()
    await slot.enter_async_context(
        call_slot(svc, principal, route.startup_timeout_s + route.timeout_s + 30)
    )
    async with contextlib.AsyncExitStack() as exits:
        exits.push_async_exit(slot)
        if streaming:
            try:
                stream = await svc.dispatcher.open_stream(order, body)
            except KilnError as exc:
                watch.failed(exc.code)
                raise
            response = await stream_response(
                request, stream, rid, watch_disconnect(request), watch, on_end=slot.aclose
            )
            exits.pop_all()  # the stream's end releases the slot (or it was released already)
            return response
        return await _sync_call(request, svc, order, body, watch)


async def resolve_entry(
    svc: RouterServices, principal: Principal, app: str, target: str
) -> tuple[FunctionRoute, CallSpec, str]:
    """The function `APP/target` (`NAME` or `Class.method`) names for this caller, its entry
    point and the method ("" for a plain function); 404 when there is none, 403 when a
    function-scoped key asks for another function, 402 when billing blocks the customer."""
    svc.billing.check(principal.customer_id)  # 402 before any work
    for param, value in (("app", app), ("name", target)):
        if not storable_text(value):  # PostgreSQL could not even look it up
            raise InvalidRequest(f"{param}={value!r} is not valid: expected a name")
    name, _, method = target.partition(".")
    route = await svc.catalog.resolve(principal.owner_id, app, name)
    if principal.function_id is not None and principal.function_id != route.function_id:
        raise PermissionDenied(f"this key may only call its own function, not {app}/{name}")
    entry = route.spec.entry(method or None)
    if entry is None:
        raise NotFound(_no_entry(app, route.spec.name, method, route.spec.kind, route.spec.entries))
    return route, entry, method


def call_slot(
    svc: RouterServices, principal: Principal, hold_s: float
) -> contextlib.AbstractAsyncContextManager[None]:
    """A slot of the customer's concurrency cap (counting the request), or nothing for an
    operator key."""
    limiter = svc.auth.limiter
    if limiter is None or principal.limits is None or principal.tier is None:
        return contextlib.nullcontext()
    return limiter.call_slot(str(principal.customer_id), principal.tier, principal.limits, hold_s)


async def _sync_call(
    request: Request, svc: RouterServices, order: CallOrder, body: bytes, watch: CallWatch
) -> Response:
    try:
        call = await svc.dispatcher.submit(order, body)
    except KilnError as exc:
        watch.failed(exc.code)
        raise

    try:
        with abandoned_if_gone(request, call):
            result = await call
    except CallAbandoned:
        watch.cancelled()
        return Response(status_code=499)
    except KilnError as exc:
        watch.failed(exc.code)
        raise
    watch.succeeded(len(result.body))
    return Response(
        result.body,
        media_type=result.content_type,
        headers={"X-Request-Id": order.request_id},
    )


def _no_entry(
    app: str, name: str, method: str, kind: UnitKind, entries: Mapping[str, object]
) -> str:
    if kind is UnitKind.CLASS:
        methods = ", ".join(sorted(entries))
        if not method:
            return f"{app}/{name} is a class; call one of its methods: {methods}"
        return f"class {name} in app {app!r} has no method {method!r}; its methods: {methods}"
    return f"{app}/{name} is a function, not a class: call it without .{method}"

"""`WS /v1/ws/APP/NAME`: a WebSocket session with a `@kiln.websocket()` handler.

The key is checked and the handler found before the upgrade: a refusal is an ordinary HTTP
error response (401, 403, 404...). The session then goes through the function's work queue like
any call, so it waits for capacity; the upgrade is accepted once a replica holds it, and the
session stays pinned to that replica for its life. Frames flow both ways over NATS, numbered
and paced by credits (`kiln.router.streams`, `kiln.invoker.sessions`). Close codes the client
sees: the handler's own, 1001 after `KILN_WS_IDLE_TIMEOUT_S` without a frame or at
`KILN_WS_MAX_SESSION_S`, 1011 when the replica dies or the handler fails. A pod's sessions
(its terminals, its tunnels) have no idle timeout and last up to a week (`POD_SESSION_S`),
not `KILN_WS_MAX_SESSION_S`: an ssh left open must survive, and the pod's own auto-stop
(`auto_stop_hours`) is their idle policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from kiln.db.enums import InvocationKind
from kiln.errors import FunctionError, InvalidRequest, KilnError
from kiln.functions.spec import CallKind
from kiln.router.auth import Principal
from kiln.router.call_log import CallWatch
from kiln.router.call_order import CallOrder
from kiln.router.catalog import FunctionRoute
from kiln.router.errors import error_response, request_id
from kiln.router.run import call_slot, resolve_entry
from kiln.router.services import RouterServices, services
from kiln.router.streams import CallStream
from kiln.wire import POD_SESSION_S, Event

__all__ = ["Bridge", "serve_session", "wait_taken", "ws_session"]

_log = logging.getLogger(__name__)
# After the client leaves, how long the handler has to see the close and return.
_GOODBYE_S = 5.0


Resolve = Callable[
    [WebSocket, RouterServices, Principal], Awaitable[tuple[FunctionRoute, str | None]]
]
Refusal = Callable[[WebSocket, KilnError], Response]


async def ws_session(websocket: WebSocket) -> None:
    await serve_session(websocket, resolve=_resolve, refusal=error_response)


async def serve_session(
    websocket: WebSocket,
    *,
    resolve: Resolve,
    refusal: Refusal,
    bridge: type[Bridge] | None = None,
    pod: Callable[[WebSocket], tuple[uuid.UUID, dict[str, str]]] | None = None,
) -> None:
    """Authenticate, find the handler (`resolve`), wait for a replica to hold the session, then
    carry frames until it ends. A refusal before the upgrade is `refusal`'s HTTP answer.
    `pod`: the session is opened on this replica (a pod's, which `resolve` found) with these
    parameters, not put in the function's queue."""
    svc = services(websocket)
    rid = request_id(websocket)
    started = asyncio.get_running_loop().time()
    watch: CallWatch | None = None
    async with contextlib.AsyncExitStack() as exits:
        try:
            principal = await svc.auth.authenticate(websocket, count=False)
            # A function's session holds one of the customer's in-flight slots for its whole
            # life. A pod's does not: the pod's slot is its own (max_pods caps them), and a
            # week-long hold would outlive a router that crashed under it.
            longest = POD_SESSION_S if pod is not None else svc.settings.ws_max_session_s
            if pod is None:
                await exits.enter_async_context(call_slot(svc, principal, longest + 600))
            route, method = await resolve(websocket, svc, principal)
            watch = CallWatch(
                svc, principal, route, method or "", InvocationKind.WEBSOCKET, rid, 0,
                started_loop=started,
            )  # fmt: skip
            target = pod(websocket) if pod is not None else None
            params = target[1] if target is not None else dict(websocket.query_params)
            body = json.dumps({"params": params}).encode()
            order = CallOrder(
                route.function_id, "application/json", method or None,
                longest, route.startup_timeout_s, rid, route.generation,
                watch.trace,
            )  # fmt: skip
            if target is not None:
                link = await svc.dispatcher.open_pod_session(order, body, target[0])
            else:
                link = await svc.dispatcher.open_session(order, body)
            await wait_taken(link)
        except KilnError as exc:
            if watch is not None:
                watch.failed(exc.code)
            await websocket.send_denial_response(refusal(websocket, exc))
            return
        await websocket.accept(headers=[(b"x-request-id", rid.encode())])
        idle_s = None if target is not None else svc.settings.ws_idle_timeout_s
        carrier = (bridge or Bridge)(websocket, svc, link, watch, idle_s=idle_s)
        try:
            await carrier.run()
        finally:
            watch.bytes_in = carrier.bytes_in
            if carrier.error_code is None:
                watch.succeeded(carrier.bytes_out)
            else:
                watch.failed(carrier.error_code, carrier.bytes_out)


async def _resolve(
    websocket: WebSocket, svc: RouterServices, principal: Principal
) -> tuple[FunctionRoute, str | None]:
    app = websocket.path_params["app"]
    full = websocket.path_params["name"]
    route, entry, method = await resolve_entry(svc, principal, app, full)
    if entry.kind is not CallKind.WEBSOCKET:
        raise InvalidRequest(
            f"{app}/{full} is not a WebSocket handler (mark it @kiln.websocket()); call it with "
            f"POST /v1/run/{app}/{full}"
        )
    return route, method


async def wait_taken(link: CallStream) -> None:
    """Until a replica holds the session; raises the call's error if it fails first."""
    taken = asyncio.ensure_future(link.taken.wait())
    try:
        await asyncio.wait({taken, link.future}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        taken.cancel()
    if not link.taken.is_set():
        link.future.result()  # raises: no capacity in time, queue down...


class Bridge:
    """Carries frames between the client's WebSocket and the replica until either side closes
    or the session goes idle. A subclass may look at the replica's text frames on their way
    (`seen`), to count what a protocol's events report."""

    def __init__(
        self,
        websocket: WebSocket,
        svc: RouterServices,
        link: CallStream,
        watch: CallWatch,
        *,
        idle_s: float | None,
    ) -> None:
        """`idle_s`: the session closes after this long without a frame (None: never)."""
        self.ws = websocket
        self.idle_s = idle_s
        self.svc = svc
        self.link = link
        self.watch = watch
        self.loop = asyncio.get_running_loop()
        self.last_frame = self.loop.time()
        self.sent = 0  # client frames sent to the replica
        self.bytes_in = 0  # of the client's frames
        self.bytes_out = 0  # of the replica's frames
        self.error_code: str | None = None  # how the session failed, if it did

    async def run(self) -> None:
        inbound = asyncio.ensure_future(self._from_client())
        outbound = asyncio.ensure_future(self._from_replica())
        # Without an idle limit, a future nothing completes: the others end the session.
        idle: asyncio.Future[None] = (
            asyncio.ensure_future(self._idle())
            if self.idle_s is not None
            else self.loop.create_future()
        )
        waiters: set[asyncio.Future[Any]] = {inbound, outbound, idle}
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (inbound, outbound, idle):
                task.cancel()
            await asyncio.gather(inbound, outbound, idle, return_exceptions=True)
        if outbound in done:
            await self._replica_ended(outbound)
        elif inbound in done and inbound.exception() is None:
            code, reason = inbound.result()
            await self._say_goodbye(code, reason)
        elif inbound in done:  # the client's side failed (sending to the replica, most likely)
            _log.warning("session %s: %r", self.link.call_id, inbound.exception())
            self.error_code = "internal_error"
            await self._close_client(1011, "internal_error")
            await self._say_goodbye(1011, "the router lost the session")
        else:
            await self._close_client(1001, "idle timeout")
            await self._say_goodbye(1001, "idle timeout")

    async def _from_client(self) -> tuple[int, str]:
        """Forward the client's frames until it closes; its close code and reason."""
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return int(message.get("code", 1000)), str(message.get("reason") or "")
            self.last_frame = self.loop.time()
            if message.get("text") is not None:
                kind, data = Event.TEXT, message["text"].encode()
            else:
                kind, data = Event.BINARY, bytes(message.get("bytes") or b"")
            await self.link.wait_for_peer(self.sent)
            await self.svc.dispatcher.send_frame(self.link, kind, self.sent, data)
            self.sent += 1
            self.bytes_in += len(data)

    async def _from_replica(self) -> None:
        """Forward the replica's frames until it ends the session (returns) or the call fails
        (raises its error)."""
        while True:
            try:
                kind, data = await self.link.next_frame()
            except StopAsyncIteration:
                return
            self.last_frame = self.loop.time()
            self.bytes_out += len(data)
            if kind == Event.TEXT:
                self.seen(data)
                await self.ws.send_text(data.decode())
            else:
                await self.ws.send_bytes(data)

    def seen(self, text: bytes) -> None:
        """A text frame from the replica, on its way to the client."""

    async def _idle(self) -> None:
        assert self.idle_s is not None
        limit = self.idle_s
        while (left := self.last_frame + limit - self.loop.time()) > 0:  # noqa: ASYNC110 - a deadline that frames move
            await asyncio.sleep(left)

    async def _replica_ended(self, outbound: asyncio.Future[None]) -> None:
        error = outbound.exception()
        if error is None:
            try:
                close = json.loads(self.link.end_body or b"{}")
                code, reason = int(close.get("code", 1000)), str(close.get("reason", ""))
            except (ValueError, TypeError, AttributeError):
                code, reason = 1000, ""
            if code == 1011:  # the handler raised
                self.error_code = FunctionError.code
            await self._close_client(code, reason)
        elif isinstance(error, KilnError):
            _log.info("session %s ended: %s", self.link.call_id, error.code)
            self.error_code = error.code
            await self._close_client(1011, error.code)
        elif isinstance(error, WebSocketDisconnect | OSError):
            await self._say_goodbye(1001, "the client went away")
        elif error is not None:
            _log.error("session %s failed: %r", self.link.call_id, error)
            self.error_code = "internal_error"
            await self._close_client(1011, "internal_error")
            self.link.abandon()

    async def _say_goodbye(self, code: int, reason: str) -> None:
        """Tell the replica the client is gone and give the handler a moment to return; then
        abandon the call (the replica cancels the handler if it still runs)."""
        if not self.link.future.done():
            close = json.dumps({"code": code, "reason": reason}).encode()
            with contextlib.suppress(Exception):
                await self.svc.dispatcher.send_frame(self.link, Event.END, self.sent, close)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.link.future), _GOODBYE_S)
        self.link.abandon()

    async def _close_client(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):  # it may have gone already
            await self.ws.close(code, reason)

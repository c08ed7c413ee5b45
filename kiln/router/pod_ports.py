"""A pod's forwarded ports through the router: `/v1/pods/ID/ports/PORT/...` for HTTP and
WebSocket, and `WS /v1/pods/ID/tunnel/PORT` for raw TCP (what `kiln pods forward` uses).

Every connection is a session on the pod's replica (`kiln.pods.tunnel`) carrying the bytes of
one TCP connection to 127.0.0.1:PORT inside the pod; no port of the GPU host is ever open.
Over `/ports/`, the router speaks HTTP/1.1 to the pod's server on that connection (h11), one
request per connection, and streams the answer back; a WebSocket there is opened to the pod's
server with websockets' own protocol code and relayed message by message. The request keeps
its whole path, so a server that lives under a base URL (Jupyter's `--ServerApp.base_url`)
builds its links right; `X-Forwarded-Prefix` names the prefix. Who may open a port, and what
of the caller's headers the pod's server gets (never its `Authorization` nor Kiln's cookies),
is `kiln.router.pod_access`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import h11
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response, StreamingResponse
from starlette.websockets import WebSocket

from kiln.errors import BadGateway, KilnError, PermissionDenied
from kiln.router.auth import Principal
from kiln.router.call_order import CallOrder
from kiln.router.catalog import FunctionRoute
from kiln.router.errors import error_response, request_id
from kiln.router.pod_access import pod_header, port_caller, sets_kiln_cookie
from kiln.router.pods import active_pod, pod_id_of
from kiln.router.run import read_body
from kiln.router.services import RouterServices, services
from kiln.router.streams import CallStream
from kiln.router.websocket import serve_session, wait_taken
from kiln.wire import POD_SESSION_S, TUNNEL_METHOD, Event

__all__ = ["forward_http", "forward_websocket", "tunnel"]

# Headers that belong to one hop, never forwarded (RFC 9110 7.6.1), and the caller's key.
_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"host", b"authorization", b"content-length",
})  # fmt: skip
# Never from a pod's server: a page under the router's origin must not take it over (a
# service worker scoped to `/` would see every console request) or wipe its storage.
_NOT_FROM_POD = frozenset({b"service-worker-allowed", b"clear-site-data"})


async def tunnel(websocket: WebSocket) -> None:
    """`WS /v1/pods/ID/tunnel/PORT`: binary frames are the TCP connection's bytes."""

    async def resolve(
        ws: WebSocket, svc: RouterServices, principal: Principal
    ) -> tuple[FunctionRoute, str | None]:
        route, replica, port = await _resolve_port(svc, principal, ws)
        ws.state.pod_target = (replica, {"port": str(port)})
        return route, TUNNEL_METHOD

    await serve_session(
        websocket, resolve=resolve, refusal=error_response, pod=lambda ws: ws.state.pod_target
    )


async def forward_http(request: Request) -> Response:
    """`/v1/pods/ID/ports/PORT/...`: one HTTP request to the pod's server."""
    svc = services(request)
    principal = await port_caller(request)
    route, replica, port = await _resolve_port(svc, principal, request)
    if request.headers.get("service-worker") == "script":
        raise PermissionDenied(
            "a pod's page cannot register a service worker: it would serve this router's "
            "origin, console included"
        )
    body = await read_body(request, svc.settings.max_request_bytes)
    link = await _Link.open(svc, route, replica, port, request_id(request))
    try:
        conn = h11.Connection(h11.CLIENT)
        headers = [*_upstream_headers(request, port), (b"content-length", str(len(body)).encode())]
        await link.send(conn.send(h11.Request(method=request.method, target=_target(request),
                                              headers=headers)))  # fmt: skip
        if body:
            await link.send(conn.send(h11.Data(data=body)))
        await link.send(conn.send(h11.EndOfMessage()))
        answer = await _next_event(conn, link, port)
        if not isinstance(answer, h11.Response):
            raise BadGateway(f"the server on port {port} in the pod answered nothing")
    except BaseException:
        await link.close()
        raise
    response = StreamingResponse(_answer_body(conn, link, port), status_code=answer.status_code)
    response.raw_headers.extend(  # as a list: a server may send several Set-Cookie
        (k, v) for k, v in answer.headers
        if k.lower() not in _HOP and k.lower() not in _NOT_FROM_POD
        and not (k.lower() == b"set-cookie" and sets_kiln_cookie(v))
    )  # fmt: skip
    return response


async def forward_websocket(websocket: WebSocket) -> None:
    """`WS /v1/pods/ID/ports/PORT/...`: a WebSocket to the pod's server, relayed."""
    from websockets.client import ClientProtocol
    from websockets.http11 import Response as WsResponse
    from websockets.uri import parse_uri

    svc = services(websocket)
    try:
        principal = await port_caller(websocket)
        route, replica, port = await _resolve_port(svc, principal, websocket)
        link = await _Link.open(svc, route, replica, port, request_id(websocket))
    except KilnError as exc:
        await websocket.send_denial_response(error_response(websocket, exc))
        return
    try:
        protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}{_target(websocket)}"),
                                  max_size=None)  # fmt: skip
        handshake = protocol.connect()
        for name, value in websocket.headers.raw:
            if name.lower() in (b"origin", b"cookie", b"sec-websocket-protocol") and (
                sent := pod_header(websocket, name, value, port)
            ):
                handshake.headers[name.decode("latin-1")] = sent.decode("latin-1")
        protocol.send_request(handshake)
        await link.send(b"".join(protocol.data_to_send()))
        response: WsResponse | None = None
        early: list[Any] = []  # frames that came with the answer
        while response is None and protocol.handshake_exc is None:
            data = await link.receive()
            if not data:
                break
            protocol.receive_data(data)
            for event in protocol.events_received():
                if response is None and isinstance(event, WsResponse):
                    response = event
                else:
                    early.append(event)
        if protocol.handshake_exc is not None or response is None:
            await websocket.send_denial_response(error_response(websocket, BadGateway(
                f"the server on port {port} in the pod refused the WebSocket"
            )))  # fmt: skip
            return
        await websocket.accept(subprotocol=response.headers.get("sec-websocket-protocol"))
        await _relay(websocket, protocol, link, early)
    finally:
        await link.close()


async def _relay(websocket: WebSocket, protocol: Any, link: _Link, early: list[Any]) -> None:
    from websockets.frames import Opcode

    async def from_client() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                protocol.send_close(int(message.get("code") or 1000))
            elif message.get("text") is not None:
                protocol.send_text(message["text"].encode())
            else:
                protocol.send_binary(bytes(message.get("bytes") or b""))
            await link.send(b"".join(protocol.data_to_send()))
            if message["type"] == "websocket.disconnect":
                return

    async def from_pod() -> None:
        parts: list[bytes] = []
        text = False
        frames = early
        while True:
            for frame in frames:
                if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                    parts, text = [bytes(frame.data)], frame.opcode is Opcode.TEXT
                elif frame.opcode is Opcode.CONT:
                    parts.append(bytes(frame.data))
                elif frame.opcode is Opcode.CLOSE:
                    with contextlib.suppress(Exception):
                        await websocket.close(protocol.close_code or 1000)
                    return
                else:
                    continue  # pings are answered by the protocol itself
                if frame.fin:
                    whole = b"".join(parts)
                    if text:
                        await websocket.send_text(whole.decode())
                    else:
                        await websocket.send_bytes(whole)
            if pending := protocol.data_to_send():
                await link.send(b"".join(pending))
            if link.ended:
                break
            data = await link.receive()
            if data:
                protocol.receive_data(data)
            else:
                protocol.receive_eof()
            frames = protocol.events_received()
        with contextlib.suppress(Exception):
            await websocket.close(1011, "the pod's server went away")

    tasks = [asyncio.ensure_future(from_client()), asyncio.ensure_future(from_pod())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Link:
    """One session to the pod's replica that carries one TCP connection's bytes."""

    def __init__(self, svc: RouterServices, stream: CallStream) -> None:
        self.svc = svc
        self.stream = stream
        self.sent = 0
        self.ended = False
        self._sending = asyncio.Lock()

    @classmethod
    async def open(
        cls, svc: RouterServices, route: FunctionRoute, replica: uuid.UUID, port: int, rid: str
    ) -> _Link:
        order = CallOrder(
            route.function_id, "application/json", TUNNEL_METHOD, POD_SESSION_S,
            route.startup_timeout_s, rid, route.generation,
        )  # fmt: skip
        body = json.dumps({"params": {"port": str(port)}}).encode()
        stream = await svc.dispatcher.open_pod_session(order, body, replica)
        await wait_taken(stream)
        return cls(svc, stream)

    async def send(self, data: bytes) -> None:
        if not data:
            return
        async with self._sending:
            await self.stream.wait_for_peer(self.sent)
            await self.svc.dispatcher.send_frame(self.stream, Event.BINARY, self.sent, data)
            self.sent += 1

    async def receive(self) -> bytes:
        """The next bytes from the pod; b"" once the connection ended."""
        if self.ended:
            return b""
        try:
            _, data = await self.stream.next_frame()
        except StopAsyncIteration:
            self.ended = True
            return b""
        return data

    def end_reason(self) -> str:
        try:
            return str(json.loads(self.stream.end_body or b"{}").get("reason", ""))
        except (ValueError, AttributeError):
            return ""

    async def close(self) -> None:
        if not self.stream.future.done():
            close = json.dumps({"code": 1000, "reason": ""}).encode()
            with contextlib.suppress(Exception):
                async with self._sending:
                    await self.svc.dispatcher.send_frame(self.stream, Event.END, self.sent, close)
        self.stream.abandon()


async def _next_event(conn: h11.Connection, link: _Link, port: int) -> Any:
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            reason = link.end_reason() or f"the server on port {port} in the pod broke HTTP"
            raise BadGateway(reason) from None
        if event is not h11.NEED_DATA:
            return event
        data = await link.receive()
        if not data and link.ended and conn.their_state is h11.SEND_RESPONSE:
            reason = link.end_reason() or f"the server on port {port} in the pod closed"
            raise BadGateway(reason)
        conn.receive_data(data)


async def _answer_body(conn: h11.Connection, link: _Link, port: int) -> AsyncIterator[bytes]:
    try:
        while True:
            event = await _next_event(conn, link, port)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return
    finally:
        await link.close()


def _target(connection: HTTPConnection) -> str:
    path = connection.scope.get("raw_path") or connection.url.path.encode()
    query = connection.scope.get("query_string") or b""
    return (path + (b"?" + query if query else b"")).decode("latin-1")


def _upstream_headers(connection: HTTPConnection, port: int) -> list[tuple[bytes, bytes]]:
    prefix = connection.url.path.split("/ports/", 1)[0] + f"/ports/{port}"
    kept = [
        (k, sent) for k, v in connection.headers.raw
        if k.lower() not in _HOP and (sent := pod_header(connection, k, v, port)) is not None
    ]  # fmt: skip
    return [
        (b"host", f"127.0.0.1:{port}".encode()),
        *kept,
        (b"connection", b"close"),
        (b"x-forwarded-host", connection.headers.get("host", "").encode("latin-1")),
        (b"x-forwarded-proto", connection.url.scheme.replace("ws", "http").encode()),
        (b"x-forwarded-prefix", prefix.encode("latin-1")),
    ]


async def _resolve_port(
    svc: RouterServices, principal: Principal, connection: HTTPConnection
) -> tuple[FunctionRoute, uuid.UUID, int]:
    """The pod's function, its replica and the port, for a caller that owns the pod."""
    text = str(connection.path_params["port"])
    port = int(text) if text.isdigit() and len(text) <= 5 else 0
    pod, route = await active_pod(svc, principal, pod_id_of(connection), port=port)
    return route, pod.replica_id, port

"""A replica's side of a WebSocket session: the `kiln.Session` a handler talks through.

Frames from the client arrive from the router on `ns.replica.<rid>.in.<router>.<call>`,
numbered; the replica grants the router more (`credit N` on the call's reply subject) as the
handler reads, half a window at a time, so a handler that stops reading stops the client.
Frames to the client go to the reply subject, numbered, never past the router's grant
(`StreamControl.limit`). A close from either side is an `end` message with its code and reason.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Mapping

from nats.aio.client import Client as NATS

from kiln.functions.session import Session, SessionClosed
from kiln.invoker.streams import StreamCredits
from kiln.wire import SESSION_WINDOW, Event, stream_event

__all__ = ["ReplicaSession"]

_MAX_REASON_BYTES = 123  # what a WebSocket close frame has room for


class ReplicaSession(Session):
    def __init__(
        self, nc: NATS, reply_subject: str, *, credits: StreamCredits, params: Mapping[str, str]
    ) -> None:
        self._nc = nc
        self._reply = reply_subject
        self._credits = credits  # frames to the client: what the router has room for
        self._params = dict(params)
        self._sent = 0
        self._inbox: deque[tuple[str, bytes]] = deque()
        self._received = 0  # frames from the client, in order
        self._read = 0
        self._limit = SESSION_WINDOW  # what the router may send us
        self._wake = asyncio.Event()
        self._closed: SessionClosed | None = None  # the client closed
        self.ended = False  # we closed (or answered the client's close)
        # A handler may send from several tasks at once; each frame needs its own number.
        self._sending = asyncio.Lock()

    @property
    def params(self) -> Mapping[str, str]:
        return self._params

    def on_frame(self, event: str, seq: int, data: bytes) -> None:
        """A message from the router: a client frame, or the client's close."""
        if seq != self._received:
            self._inbox.append((Event.END, b'{"code":1011,"reason":"frames were lost"}'))
        else:
            self._received += 1
            self._inbox.append((event, data))
        self._wake.set()

    async def receive(self) -> str | bytes:
        while not self._inbox:
            if self._closed is not None:
                raise self._closed
            self._wake.clear()
            await self._wake.wait()
        event, data = self._inbox.popleft()
        if event == Event.END:
            try:
                close = json.loads(data)
                self._closed = SessionClosed(int(close["code"]), str(close.get("reason", "")))
            except (ValueError, KeyError, TypeError):
                self._closed = SessionClosed(1005)
            self._inbox.clear()
            raise self._closed
        self._read += 1
        if self._limit - self._read <= SESSION_WINDOW // 2:
            self._limit = self._read + SESSION_WINDOW
            await self._nc.publish(
                self._reply, b"", headers=stream_event(Event.CREDIT, self._limit)
            )
        return data.decode() if event == Event.TEXT else data

    async def send(self, message: str | bytes) -> None:
        if self.ended or self._closed is not None:
            raise self._closed or SessionClosed(1000, "the session was closed")
        if isinstance(message, str):
            event, data = Event.TEXT, message.encode()
        elif isinstance(message, bytes | bytearray | memoryview):
            event, data = Event.BINARY, bytes(message)
        else:
            raise TypeError(f"a session sends str or bytes, not {type(message).__name__}")
        async with self._sending:
            await self._credits.wait_for(self._sent)
            await self._nc.publish(self._reply, data, headers=stream_event(event, self._sent))
            self._sent += 1

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.ended:
            return
        if not (code == 1000 or 3000 <= code <= 4999 or code in (1001, 1008, 1011)):
            raise ValueError(
                f"close code {code} is not one a handler may send: use 1000 or 3000-4999"
            )
        if len(reason.encode()) > _MAX_REASON_BYTES:
            raise ValueError(f"a close reason has at most {_MAX_REASON_BYTES} bytes")
        self.ended = True
        body = json.dumps({"code": code, "reason": reason}).encode()
        await self._nc.publish(self._reply, body, headers=stream_event(Event.END, self._sent))

"""The router's side of a streaming call or a WebSocket session: what a replica sends, in order,
and the credit that paces it (and, for a session, the replica's credit for the client's frames).

The router holds at most `window` chunks of a stream. It grants the replica more
(`StreamControl.limit`) as the client reads, half a window at a time, so a client that keeps up
never waits for a grant and a slow one stops the generator instead of filling the router's
memory. A chunk out of order means one was lost on the way: the stream ends with an error, it
never skips silently.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from kiln.errors import StreamBroken
from kiln.wire import SESSION_WINDOW, Event, StreamControl

__all__ = ["STREAM_WINDOW", "CallAbandoned", "CallStream"]

# Chunks a stream may have in flight towards the router before the client reads them.
STREAM_WINDOW = 32


class CallAbandoned(Exception):
    """The caller left (disconnected) before the call finished: nobody is left to answer, and
    the replica is told to stop."""


_FRAMES = (Event.CHUNK, Event.TEXT, Event.BINARY)


class CallStream:
    """The chunks of one streaming call, read with `async for`. The iteration ends after the
    replica's end message, or raises the call's error once the chunks before it are read."""

    def __init__(
        self,
        future: asyncio.Future[Any],
        *,
        router: str,
        call_id: str,
        window: int,
        send_control: Callable[[StreamControl], None],
    ) -> None:
        self.future = future
        self.router = router
        self.call_id = call_id
        self.window = window
        self.limit = window
        self.sent = 0  # chunks received from the replica, in order
        self.read = 0  # chunks handed to the reader
        self._chunks: deque[tuple[str, bytes | asyncio.Future[bytes]]] = deque()
        self._send_control = send_control
        self._wake = asyncio.Event()
        future.add_done_callback(lambda _: self._wake.set())
        self.end_body = b""  # what the replica's end message said (a session's close)
        self.replica_id: str | None = None
        self.taken = asyncio.Event()  # a replica took the call
        self.peer_limit = SESSION_WINDOW  # a session: client frames the replica has room for
        self._peer_credit = asyncio.Event()

    # Fed by the dispatcher -------------------------------------------------------------------

    def on_event(self, event: str, seq: int, data: bytes | asyncio.Future[bytes]) -> None:
        """A message of the stream; `data` is a future when the chunk is being fetched from the
        payload store (it is still read in its place)."""
        if self.future.done():
            return
        if event in _FRAMES:
            if seq != self.sent:
                self._broken(f"chunk {self.sent} was lost (chunk {seq} came instead)")
                return
            self.sent += 1
            self._chunks.append((event, data))
            self._wake.set()
        elif event == Event.END:
            if seq != self.sent:
                self._broken(f"the stream ended after {seq} chunks, but {self.sent} arrived")
                return
            if isinstance(data, bytes):
                self.end_body = data
            self.future.set_result(None)
        elif event == Event.CREDIT and seq > self.peer_limit:
            self.peer_limit = seq
            self._peer_credit.set()

    def on_taken(self, replica_id: str) -> None:
        self.replica_id = replica_id
        self.taken.set()
        self.grant()  # one that was due before we knew where to send it

    def _broken(self, why: str) -> None:
        self.future.set_exception(StreamBroken(f"the stream broke: {why}"))

    # Read by the response --------------------------------------------------------------------

    def __aiter__(self) -> CallStream:
        return self

    async def __anext__(self) -> bytes:
        return (await self.next_frame())[1]

    async def next_frame(self) -> tuple[str, bytes]:
        """The next chunk or frame and its kind (`Event.CHUNK`, `TEXT` or `BINARY`); raises
        StopAsyncIteration after the end, or the call's error."""
        while not self._chunks:
            if self.future.done():
                self.future.result()  # the call's error, if it failed
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()
        kind, chunk = self._chunks.popleft()
        if isinstance(chunk, asyncio.Future):
            chunk = await chunk
        self.read += 1
        if self.limit - self.read <= self.window // 2 and not self.future.done():
            self.limit = self.read + self.window
            self.grant()
        return kind, chunk

    async def wait_for_peer(self, seq: int) -> None:
        """A session: wait until the replica has room for the client's frame `seq`, or the
        call is over (its error raised)."""
        while seq >= self.peer_limit:
            if self.future.done():
                self.future.result()
                raise StopAsyncIteration
            self._peer_credit.clear()
            waiter = asyncio.ensure_future(self._peer_credit.wait())
            try:
                await asyncio.wait({waiter, self.future}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()

    def grant(self) -> None:
        """Tell the replica how far it may go (again, once it is known: `Dispatcher`)."""
        if self.limit > self.window:
            self._send_control(StreamControl(self.router, self.call_id, limit=self.limit))

    def abandon(self) -> None:
        """The reader is gone: fail the call, which tells its replica to stop."""
        if not self.future.done():
            self.future.set_exception(CallAbandoned())

"""A replica's side of a streaming call: send each chunk a generator yields to the caller's
router, numbered, and never more than the router has room for.

The router says in the call how many chunks it can hold (`CallHeaders.window`) and raises that
limit as its client reads (`StreamControl.limit`). A slow client so pauses the generator itself
instead of piling chunks up anywhere; nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable

from nats.aio.client import Client as NATS

from kiln.errors import ResultTooLarge
from kiln.payloads import MAX_RESULT_BYTES
from kiln.wire import Event, H, stream_event

__all__ = ["StreamCredits", "send_stream"]


class StreamCredits:
    """The chunks one streaming call may send: sequence numbers below `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._raised = asyncio.Event()

    def grant(self, limit: int) -> None:
        if limit > self.limit:
            self.limit = limit
            self._raised.set()

    async def wait_for(self, seq: int) -> None:
        while seq >= self.limit:
            self._raised.clear()
            await self._raised.wait()


async def send_stream(
    nc: NATS,
    subject: str,
    chunks: AsyncGenerator[bytes, None],
    credits: StreamCredits,
    *,
    store: Callable[[bytes], Awaitable[str]],
    inline_bytes: int,
) -> int:
    """Publish every chunk to `subject` as it comes, then the end; the number of chunks sent.
    The generator is asked for its next item only once the previous chunk is sent and the
    credit allows one more. A chunk over `inline_bytes` goes through the payload store
    (`store` keeps it and says its name)."""
    seq = 0
    # Closed on every way out (an error, a cancel), so the generator's `finally` runs now.
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            if len(chunk) > MAX_RESULT_BYTES:
                raise ResultTooLarge(
                    f"chunk {seq} has {len(chunk)} bytes; stream chunks are limited to "
                    f"{MAX_RESULT_BYTES} bytes"
                )
            await credits.wait_for(seq)
            headers = stream_event(Event.CHUNK, seq)
            if len(chunk) > inline_bytes:
                headers[H.PAYLOAD] = await store(chunk)
                chunk = b""
            await nc.publish(subject, chunk, headers=headers)
            seq += 1
    await nc.publish(subject, b"", headers=stream_event(Event.END, seq))
    return seq

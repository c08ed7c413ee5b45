"""A generator's results as an HTTP response, sent as they come: Server-Sent Events when the
client accepts `text/event-stream`, else newline-delimited JSON.

Each chunk is one JSON value (what the generator yielded; bytes as a base64 string) with its
sequence number. The response's status is decided by the first chunk: an error before it (bad
arguments, no capacity in time) is an ordinary JSON error response; an error after it is the
stream's last event.

SSE:    `id: 3` / `data: <json>` per chunk; `event: end` with `{"chunks": N}`; `event: error`
        with the API's error body.
NDJSON: `{"seq": 3, "data": <json>}` per line; `{"end": true, "chunks": N}`; or
        `{"error": {...}}`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from kiln.errors import KilnError
from kiln.router.call_log import CallWatch
from kiln.router.streams import CallAbandoned, CallStream

__all__ = ["NDJSON", "SSE", "stream_response", "wants_sse"]


async def _nothing() -> None:
    return None


SSE = "text/event-stream"
NDJSON = "application/x-ndjson"


def wants_sse(request: Request) -> bool:
    return SSE in request.headers.get("accept", "")


class _Format:
    def __init__(self, sse: bool) -> None:
        self.sse = sse
        self.media_type = SSE if sse else NDJSON

    def chunk(self, seq: int, data: bytes) -> bytes:
        if self.sse:
            return b"id: %d\ndata: %s\n\n" % (seq, data)
        return b'{"seq":%d,"data":%s}\n' % (seq, data)

    def end(self, chunks: int) -> bytes:
        if self.sse:
            return b'event: end\ndata: {"chunks":%d}\n\n' % chunks
        return b'{"end":true,"chunks":%d}\n' % chunks

    def error(self, body: dict[str, Any]) -> bytes:
        data = json.dumps(body, separators=(",", ":")).encode()
        if self.sse:
            return b"event: error\ndata: %s\n\n" % data
        return data + b"\n"


async def stream_response(
    request: Request,
    stream: CallStream,
    request_id: str,
    on_disconnect_watch: Callable[[Callable[[], None]], Callable[[], None]],
    watch: CallWatch,
    *,
    on_end: Callable[[], Awaitable[None]] = _nothing,
) -> Response:
    """The response for `stream`, once its first chunk (or its end, or its error) is in.
    `on_disconnect_watch(abandon)` watches for the client leaving meanwhile and returns a
    function that stops watching. `watch` records how the stream ended and what it sent;
    `on_end` runs once the stream is over, however it ends."""
    fmt = _Format(wants_sse(request))
    stop_watching = on_disconnect_watch(stream.abandon)
    try:
        first = await anext(stream, None)
    except CallAbandoned:
        watch.cancelled()
        await on_end()
        return Response(status_code=499)
    except BaseException as exc:
        watch.failed(exc.code if isinstance(exc, KilnError) else "internal_error")
        stream.abandon()
        await on_end()
        raise
    finally:
        stop_watching()
    return StreamingResponse(
        _body(fmt, stream, first, request_id, watch, on_end),
        media_type=fmt.media_type,
        headers={
            "X-Request-Id": request_id,
            "Cache-Control": "no-cache",
            # Reverse proxies (nginx) would otherwise buffer the stream.
            "X-Accel-Buffering": "no",
        },
    )


async def _body(
    fmt: _Format,
    stream: CallStream,
    first: bytes | None,
    request_id: str,
    watch: CallWatch,
    on_end: Callable[[], Awaitable[None]],
) -> AsyncIterator[bytes]:
    seq = 0
    sent = 0  # bytes of the chunks' data
    try:
        if first is not None:
            yield fmt.chunk(0, first)
            seq, sent = 1, len(first)
            async for chunk in stream:
                yield fmt.chunk(seq, chunk)
                seq += 1
                sent += len(chunk)
        yield fmt.end(seq)
        watch.succeeded(sent)
    except KilnError as exc:
        watch.failed(exc.code, sent)
        yield fmt.error(exc.to_body(request_id))
    except (asyncio.CancelledError, GeneratorExit, CallAbandoned):
        watch.cancelled(sent)
        raise  # the client left (Starlette cancels the response): the finally stops the call
    finally:
        watch.failed("internal_error", sent)  # only if nothing above recorded it
        stream.abandon()  # does nothing once the stream has ended
        await on_end()

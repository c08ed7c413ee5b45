"""Both ends of a stream's pacing without a network: the router's `CallStream` (order, gaps,
grants, errors after the chunks before them) and the replica's `StreamCredits`."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kiln.errors import FunctionError, StreamBroken
from kiln.invoker.streams import StreamCredits
from kiln.router.streams import CallAbandoned, CallStream
from kiln.wire import Event, StreamControl


def make_stream(window: int = 4) -> tuple[CallStream, list[StreamControl]]:
    sent: list[StreamControl] = []
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    stream = CallStream(future, router="r", call_id="c", window=window, send_control=sent.append)
    return stream, sent


async def test_chunks_are_read_in_order_and_the_end_stops_the_iteration() -> None:
    stream, _ = make_stream()
    for seq in range(3):
        stream.on_event(Event.CHUNK, seq, b"%d" % seq)
    stream.on_event(Event.END, 3, b"")
    assert [chunk async for chunk in stream] == [b"0", b"1", b"2"]


async def test_reading_grants_more_half_a_window_at_a_time() -> None:
    stream, sent = make_stream(window=4)
    for seq in range(4):
        stream.on_event(Event.CHUNK, seq, b"x")
    await anext(stream)
    assert sent == []  # 3 still allowed ahead of the reader
    await anext(stream)
    assert sent == [StreamControl("r", "c", limit=6)]
    await anext(stream)
    await anext(stream)
    assert sent[-1] == StreamControl("r", "c", limit=8)


async def test_a_lost_chunk_breaks_the_stream_after_the_chunks_before_it() -> None:
    stream, _ = make_stream()
    stream.on_event(Event.CHUNK, 0, b"a")
    stream.on_event(Event.CHUNK, 2, b"c")
    assert await anext(stream) == b"a"
    with pytest.raises(StreamBroken, match=r"chunk 1 was lost \(chunk 2 came instead\)"):
        await anext(stream)


async def test_an_end_that_counts_more_chunks_than_arrived_breaks_the_stream() -> None:
    stream, _ = make_stream()
    stream.on_event(Event.CHUNK, 0, b"a")
    stream.on_event(Event.END, 2, b"")
    with pytest.raises(StreamBroken, match="ended after 2 chunks, but 1 arrived"):
        [chunk async for chunk in stream]


async def test_the_calls_error_comes_after_the_chunks_that_preceded_it() -> None:
    stream, _ = make_stream()
    stream.on_event(Event.CHUNK, 0, b"a")
    stream.future.set_exception(FunctionError("ValueError: no"))
    assert await anext(stream) == b"a"
    with pytest.raises(FunctionError):
        await anext(stream)


async def test_a_reader_waits_for_the_next_chunk_and_abandoning_ends_the_wait() -> None:
    stream, _ = make_stream()
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    assert not waiting.done()
    stream.on_event(Event.CHUNK, 0, b"a")
    assert await waiting == b"a"
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    stream.abandon()
    with pytest.raises(CallAbandoned):
        await waiting
    stream.on_event(Event.CHUNK, 1, b"late")  # ignored once the call is over


async def test_credits_hold_the_sender_until_granted() -> None:
    credits = StreamCredits(2)
    await credits.wait_for(1)
    blocked = asyncio.ensure_future(credits.wait_for(2))
    await asyncio.sleep(0)
    assert not blocked.done()
    credits.grant(2)  # not more than before: still held
    await asyncio.sleep(0)
    assert not blocked.done()
    credits.grant(3)
    await asyncio.wait_for(blocked, 1)

"""A replica's call feed against a real JetStream work queue: it asks for exactly its free slots,
keeps asking as slots free, replaces expired requests and hands back calls after intake closes."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats
import pytest
from eventually import eventually
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig

from kiln._nats import connect_options
from kiln.invoker import feed as feed_module
from kiln.invoker.feed import CallFeed
from kiln.settings import Settings

pytestmark = pytest.mark.integration


@dataclass
class Queue:
    nc: NATS
    js: JetStreamContext
    stream: str
    consumer: str
    subject: str

    async def put(self, count: int) -> None:
        for i in range(count):
            await self.js.publish(self.subject, str(i).encode())

    async def consumer_state(self) -> tuple[int, int, int]:
        info = await self.js.consumer_info(self.stream, self.consumer)
        return int(info.num_pending or 0), int(info.num_ack_pending or 0), int(info.num_waiting)

    async def waiting(self) -> int:
        """Pull requests parked at the server."""
        return (await self.consumer_state())[2]

    async def requests(self) -> list[Msg]:
        """The pull requests sent for the consumer from now on."""
        seen: list[Msg] = []

        async def note(msg: Msg) -> None:
            seen.append(msg)

        await self.nc.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}", cb=note)
        await self.nc.flush()
        return seen


@pytest.fixture
async def queue(settings: Settings) -> AsyncIterator[Queue]:
    nc = await nats.connect(**connect_options(settings))
    js = nc.jetstream()
    name = f"{settings.namespace}_feed_{secrets.token_hex(3)}"
    subject = f"{settings.namespace}.feed.{secrets.token_hex(3)}"
    await js.add_stream(
        StreamConfig(name=name, subjects=[subject], retention=RetentionPolicy.WORK_QUEUE)
    )
    await js.add_consumer(
        name, ConsumerConfig(durable_name="c", ack_policy=AckPolicy.EXPLICIT, ack_wait=30)
    )
    try:
        yield Queue(nc, js, name, "c", subject)
    finally:
        await js.delete_stream(name)
        await nc.close()


def make_feed(queue: Queue, slots: int, held: list[Msg]) -> CallFeed:
    """A feed whose calls pile up in `held`: a slot frees when the test removes a call."""
    return CallFeed(
        queue.nc,
        queue.stream,
        queue.consumer,
        free_slots=lambda: slots - len(held),
        on_call=held.append,
    )


async def test_the_feed_takes_only_as_many_calls_as_it_has_free_slots(queue: Queue) -> None:
    held: list[Msg] = []
    slots = 3
    feed = make_feed(queue, slots, held)
    await feed.start()
    try:
        await queue.put(5)
        await feed.top_up()
        await eventually(lambda: len(held) == 3, within_s=5)
        assert feed.outstanding == 0  # nothing more is coming
        pending, ack_pending, _ = await queue.consumer_state()
        assert (pending, ack_pending) == (2, 3)  # as the server counts what it delivered
        assert len(held) == 3  # no more than its slots
        # Two slots free up: the feed asks for two more, and gets the last two.
        for msg in held[:2]:
            await msg.ack()
        del held[:2]
        await feed.top_up()
        await eventually(lambda: len(held) == 3, within_s=5)
        assert sorted(int(m.data) for m in held) == [2, 3, 4]
    finally:
        await feed.close()


async def test_an_idle_feed_waits_for_calls_that_arrive_later(queue: Queue) -> None:
    held: list[Msg] = []
    feed = make_feed(queue, 2, held)
    await feed.start()
    try:
        await feed.top_up()
        await eventually(lambda: feed.outstanding == 2, within_s=5)
        await eventually(queue.waiting, within_s=5)  # the request is parked at the server
        await queue.put(1)
        await eventually(lambda: len(held) == 1, within_s=5)
        assert feed.outstanding == 1
    finally:
        await feed.close()


async def test_expired_requests_are_replaced(queue: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feed_module, "_PULL_EXPIRES_S", 0.3)
    held: list[Msg] = []
    feed = make_feed(queue, 1, held)
    await feed.start()
    try:
        asked = await queue.requests()
        await feed.top_up()
        await eventually(lambda: len(asked) == 2, within_s=5)  # a 408, and the feed asked again
        assert await queue.waiting() == 1
        assert feed.outstanding == 1
        await queue.put(1)
        await eventually(lambda: len(held) == 1, within_s=5)
    finally:
        await feed.close()


async def test_calls_that_arrive_after_intake_closes_go_back_to_the_queue(queue: Queue) -> None:
    held: list[Msg] = []
    feed = make_feed(queue, 4, held)
    await feed.start()
    try:
        await feed.top_up()
        await eventually(lambda: feed.outstanding == 4, within_s=5)
        feed.close_intake()
        await queue.put(2)
        # Delivered (and NAKed, and delivered again) until its requests were used up.
        await eventually(lambda: feed.outstanding == 0, within_s=5)
        assert held == []
        await feed.close()
        pending, ack_pending, _ = await queue.consumer_state()
        assert pending + ack_pending == 2
        # Naked, not parked until ack_wait: a new feed gets them at once.
        other: list[Msg] = []
        second = make_feed(queue, 4, other)
        await second.start()
        await second.top_up()
        await eventually(lambda: len(other) == 2, within_s=3)
        await second.close()
    finally:
        await feed.close()

"""A router takes a call's reply only with the call's function and token in its subject: a
replica can get JetStream to publish its bytes on any subject, but only the replica that took
a call knows the call's token."""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from typing import Any, cast

import pytest
from eventually import eventually
from nats.aio.msg import Msg

from kiln._jetstream import MSG_ID
from kiln.errors import WorkerLost
from kiln.router import dispatch
from kiln.router.call_order import CallOrder
from kiln.router.dispatch import Dispatcher, _Call, _Phase
from kiln.seal import Seals
from kiln.wire import CallHeaders, Event, H, ReplicaHeartbeat, Subjects, encode


class _NoNats:
    def jetstream(self) -> None:
        return None


def reply(subject: str, body: bytes) -> Msg:
    return Msg(cast(Any, None), subject=subject, data=body, headers={H.EVENT: Event.RESULT})


async def test_a_reply_without_the_calls_token_or_function_is_ignored() -> None:
    subjects = Subjects("t")
    dispatcher = Dispatcher(cast(Any, _NoNats()), subjects, seals=Seals(None), stream_replicas=1)
    function, other = uuid.uuid4(), uuid.uuid4()
    headers = CallHeaders(
        "7", dispatcher.router_id, "application/json", time.time() + 5, 5.0, token="a1b2"
    )
    future = asyncio.get_running_loop().create_future()
    dispatcher._calls["7"] = _Call(future, headers, 5.0, function.hex)
    router = dispatcher.router_id
    for forged in (
        subjects.reply(router, function, "7", "guess"),  # the right call, not its token
        subjects.reply(router, other, "7", "a1b2"),  # another function's replica
    ):
        await dispatcher._on_reply(reply(forged, b'"forged"'))
        assert not future.done()
    await dispatcher._on_reply(reply(subjects.reply(router, function, "7", "a1b2"), b'"real"'))
    assert future.result().body == b'"real"'


class _SilentStream:
    """A NATS connection whose JetStream answers nothing (a stream electing a leader) until
    told to, then acknowledges the publishes it gets."""

    def __init__(self, dispatcher_box: list[Dispatcher], answer_after: int) -> None:
        self.box = dispatcher_box
        self.answer_after = answer_after
        self.published: list[dict[str, str]] = []
        self.max_payload = 1 << 20
        self.is_connected = True

    def jetstream(self) -> None:
        return None

    async def publish(
        self, subject: str, body: bytes, *, reply: str = "", headers: dict[str, str]
    ) -> None:
        if not reply:
            return  # a demand hint
        self.published.append(headers)
        if len(self.published) > self.answer_after:
            ack = Msg(cast(Any, None), subject=reply, data=b'{"stream":"t_calls","seq":1}')
            asyncio.get_running_loop().call_soon(
                lambda: asyncio.ensure_future(self.box[0]._on_reply(ack))
            )


async def test_an_unanswered_call_is_published_again_with_its_message_id_until_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    box: list[Dispatcher] = []
    nc = _SilentStream(box, answer_after=2)  # two publishes go unanswered
    dispatcher = Dispatcher(cast(Any, nc), Subjects("t"), seals=Seals(None), stream_replicas=1)
    box.append(dispatcher)
    order = CallOrder(
        function_id=uuid.uuid4(), content_type="application/json", method=None, timeout_s=5.0,
        startup_timeout_s=30.0, request_id="r",
    )  # fmt: skip
    # This test's patience for each PubAck, not the product's.
    monkeypatch.setattr(dispatch, "_PUBACK_WAIT_S", 0.05)
    monkeypatch.setattr(dispatch, "_REPUBLISH_WAIT_S", 0.05)
    call = await dispatcher._publish(order, b"{}", window=0)

    def stored() -> bool:  # an event of its own would change the product
        if call.future.done():
            pytest.fail(f"{call.future}")
        return call.phase is not _Phase.PUBLISHED

    await eventually(stored, within_s=10, every_s=0.01, what=f"stored after {nc.published}")
    assert len(nc.published) == 3
    assert len({headers[MSG_ID] for headers in nc.published}) == 1  # stored once, whatever
    assert call.publish is None  # the body is let go once stored
    call.future.cancel()


async def test_a_call_whose_answer_was_lost_fails_when_its_replica_says_it_runs_nothing() -> None:
    subjects = Subjects("t")
    dispatcher = Dispatcher(cast(Any, _NoNats()), subjects, seals=Seals(None), stream_replicas=1)
    function, replica = uuid.uuid4(), uuid.uuid4()
    calls = {}
    for call_id in ("a", "b"):
        headers = CallHeaders(
            call_id, dispatcher.router_id, "application/json", time.time() + 5, 5.0, token="t"
        )
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        calls[call_id] = dispatcher._calls[call_id] = _Call(future, headers, 5.0, function.hex)
        future.add_done_callback(functools.partial(dispatcher._forget, call_id))
    accepted = {"replica": str(replica), "calls": ["a", "b"], "tokens": ["t", "t"]}
    await dispatcher._on_accepted(Msg(
        cast(Any, None), subject=subjects.accepted(dispatcher.router_id, function),
        data=json.dumps(accepted).encode(),
    ))  # fmt: skip
    # "a" is answered; then the replica reports, on the same connection, that it runs nothing.
    await dispatcher._on_reply(reply(subjects.reply(dispatcher.router_id, function, "a", "t"),
                                     b'"done"'))  # fmt: skip

    def beat(in_flight: int) -> Msg:
        data = encode(ReplicaHeartbeat(
            str(replica), function.hex, "v", "node", "ready", in_flight, None
        ))  # fmt: skip
        return Msg(cast(Any, None), subject=subjects.replica_heartbeat(replica), data=data)

    await dispatcher._on_heartbeat(beat(1))  # still busy with "b": nothing is lost
    assert not calls["b"].future.done()
    await dispatcher._on_heartbeat(beat(0))
    # Its answer may still wait behind the heartbeat here: not yet.
    assert not calls["b"].future.done()
    calls["b"].idle_seen -= dispatch._ANSWER_LOST_AFTER_S  # idle that long since
    await dispatcher._on_heartbeat(beat(0))
    assert calls["a"].future.result().body == b'"done"'
    error = calls["b"].future.exception()
    assert isinstance(error, WorkerLost)
    assert "answer was lost on its way back" in error.message
    await asyncio.sleep(0)  # the futures' done callbacks (the router forgets them) run
    assert dispatcher._running_on == {}

"""A router takes a call's reply only with the call's function and token in its subject: a
replica can get JetStream to publish its bytes on any subject, but only the replica that took
a call knows the call's token."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, cast

from nats.aio.msg import Msg

from kiln.router.dispatch import Dispatcher, _Call
from kiln.seal import Seals
from kiln.wire import CallHeaders, Event, H, Subjects


class _NoNats:
    def jetstream(self) -> None:
        return None


def reply(subject: str, body: bytes) -> Msg:
    return Msg(cast(Any, None), subject=subject, data=body, headers={H.EVENT: Event.RESULT})


async def test_a_reply_without_the_calls_token_or_function_is_ignored() -> None:
    subjects = Subjects("t")
    dispatcher = Dispatcher(cast(Any, _NoNats()), subjects, seals=Seals(None))
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

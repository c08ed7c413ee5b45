"""`GET /v1/functions/APP/FN/logs`: what a function's replicas printed and logged
(`kiln.invoker.output`), from the `<ns>_logs` JetStream stream, for the function's owner.

The answer is newline-delimited JSON, one record per line: `t` (epoch seconds), `replica`,
`stream` (stdout, stderr, log, kiln), `line`, and while a call ran `call` and `request_id`
(`level` for log records). Query: `since` (an ISO time, or a span back from now such as 10m;
default 1h), `follow` (true: keep the answer open and send new lines as they come),
`request_id` (only that request's lines). While following, an empty line every few seconds
keeps an idle connection open. Each answer reads through an ephemeral consumer of
its own that NATS deletes once the answer ends.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
)
from nats.js.errors import FetchTimeoutError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from kiln.db.session import transaction
from kiln.router.bodies import LogsQuery
from kiln.router.control import control_principal, owned_function
from kiln.router.services import services
from kiln.router.validation import read_query
from kiln.wire import Subjects

__all__ = ["function_logs"]

_NDJSON = "application/x-ndjson"
_DEFAULT_SINCE = timedelta(hours=1)
_BATCH = 256
_CAUGHT_UP_WAIT_S = 0.5  # without follow: no message this long means there is no more
_FOLLOW_WAIT_S = 5.0
_CONSUMER_IDLE_S = 30.0  # NATS deletes a reader's consumer this long after it stops asking


async def function_logs(request: Request) -> Response:
    svc = services(request)
    principal = await control_principal(request)
    asked = read_query(request, LogsQuery)
    since = asked.since or datetime.now(UTC) - _DEFAULT_SINCE
    follow, only = asked.follow, asked.request_id
    async with transaction(svc.sessions) as session:
        function = await owned_function(session, request, principal)
    subjects = Subjects(svc.settings.namespace)
    js = svc.dispatcher.nc.jetstream()
    consumer = await js.add_consumer(
        subjects.logs_stream,
        ConsumerConfig(
            filter_subject=subjects.logs(function.id),
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=since,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=_CONSUMER_IDLE_S,
            mem_storage=True,
        ),
    )
    sub = await js.pull_subscribe_bind(
        stream=subjects.logs_stream, consumer=consumer.name, name=consumer.name
    )
    sealed = functools.partial(
        svc.dispatcher.seals.function_sent, function_id=function.id, what="log lines"
    )
    lines = _lines(
        js, sub, (subjects.logs_stream, consumer.name),
        follow=follow, request_id=only, sealed=sealed,
    )  # fmt: skip
    return StreamingResponse(
        lines,
        media_type=_NDJSON,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _lines(
    js: JetStreamContext,
    sub: JetStreamContext.PullSubscription,
    consumer: tuple[str, str],
    *,
    follow: bool,
    request_id: str | None,
    sealed: Callable[[Msg], bool],
) -> AsyncIterator[bytes]:
    """The stored lines, oldest first; then, with `follow`, new ones until the client leaves
    (Starlette cancels this generator). Only lines the function's replicas `sealed` are shown
    (a replica can have the server publish lines on any function's subject: kiln.seal)."""
    try:
        while True:
            try:
                messages = await sub.fetch(
                    _BATCH, timeout=_FOLLOW_WAIT_S if follow else _CAUGHT_UP_WAIT_S
                )
            except (TimeoutError, FetchTimeoutError):
                if follow:
                    yield b"\n"  # keeps idle connections (and proxies' timers) alive
                    continue
                return
            for msg in messages:
                if not sealed(msg):
                    continue
                lines = msg.data.split(b"\n")
                if request_id is not None:
                    lines = [line for line in lines if _of_request(line, request_id)]
                if lines:
                    yield b"\n".join(lines) + b"\n"
            if not follow and messages and messages[-1].metadata.num_pending == 0:
                return
    finally:
        with contextlib.suppress(Exception):  # gone already: NATS deletes it when idle
            await sub.unsubscribe()
            await js.delete_consumer(*consumer)


def _of_request(line: bytes, request_id: str) -> bool:
    if request_id.encode() not in line:  # most lines: no parse
        return False
    try:
        return bool(json.loads(line).get("request_id") == request_id)
    except ValueError:
        return False

"""The router's side of NATS dispatch: publish a call into the function's work queue, wait for
the replica's reply on this router's inbox, and notice a replica that dies mid-call.

One subscription serves every call: replies arrive on `ns.reply.<router>.<call>` and are routed
to the waiting request by call id. Each replica heartbeats every second; a call whose replica
has been silent for `REPLICA_LOST_AFTER_S` fails with `worker_lost` at once instead of waiting
for its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from kiln.errors import (
    FunctionError,
    FunctionTimeout,
    InternalError,
    InvalidArguments,
    KilnError,
    ResultTooLarge,
    Unavailable,
    UnserializableResult,
    WorkerLost,
)
from kiln.wire import (
    HEARTBEAT_INTERVAL_S,
    REPLICA_LOST_AFTER_S,
    CallHeaders,
    Event,
    H,
    Subjects,
)

__all__ = ["CallResult", "Dispatcher", "ensure_calls_stream"]

# Errors a replica reports, by code, turned back into the router's exception classes.
_REMOTE_ERRORS: dict[str, type[KilnError]] = {
    cls.code: cls
    for cls in (
        FunctionError,
        UnserializableResult,
        ResultTooLarge,
        InvalidArguments,
        FunctionTimeout,
        WorkerLost,
    )
}
# After a replica accepted a call it has `timeout` to answer; this covers the reply's trip.
_REPLY_GRACE_S = 2.0
_HINT_INTERVAL_S = 0.25
_HEADER_ROOM = 8 * 1024


@dataclass
class CallResult:
    body: bytes
    content_type: str
    replica_id: str


@dataclass
class _Pending:
    future: asyncio.Future[CallResult]
    accepted: asyncio.Event = field(default_factory=asyncio.Event)
    replica_id: str | None = None


async def ensure_calls_stream(js: JetStreamContext, subjects: Subjects) -> None:
    """The work queue all calls go through: a message is removed once a replica acks it."""
    config = StreamConfig(
        name=subjects.calls_stream,
        subjects=[subjects.all_calls],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        max_age=24 * 3600,
    )
    try:
        await js.add_stream(config)
    except Exception:  # noqa: BLE001 - exists already (maybe with other limits): update it
        await js.update_stream(config)


class Dispatcher:
    def __init__(self, nc: NATS, js: JetStreamContext, subjects: Subjects) -> None:
        self.nc = nc
        self.js = js
        self.subjects = subjects
        self.router_id = secrets.token_hex(6)
        self._pending: dict[str, _Pending] = {}
        self._last_seen: dict[str, float] = {}
        self._hinted: dict[uuid.UUID, float] = {}
        self._call_ids = itertools.count(1)
        self._subscriptions: list[Subscription] = []
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def max_body_bytes(self) -> int:
        """The largest call body NATS carries (its max_payload, less room for headers); larger
        payloads will travel through the object store (issue 6)."""
        return max(1024, int(self.nc.max_payload) - _HEADER_ROOM)

    async def start(self) -> None:
        self._subscriptions = [
            await self.nc.subscribe(self.subjects.replies(self.router_id), cb=self._on_reply),
            await self.nc.subscribe(self.subjects.all_replica_heartbeats, cb=self._on_heartbeat),
        ]
        self._watchdog = asyncio.create_task(self._watch(), name="kiln-dispatch-watchdog")

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        for sub in self._subscriptions:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(
                    Unavailable("the router is shutting down", retry_after=1)
                )
            pending.accepted.set()

    async def call(
        self,
        function_id: uuid.UUID,
        body: bytes,
        *,
        content_type: str,
        method: str | None,
        timeout_s: float,
        startup_timeout_s: float,
        request_id: str,
        generation: int = 0,
    ) -> CallResult:
        # Unique within this router, whose id is in the reply subject; a counter spares the
        # urandom system call that uuid4 makes on every request.
        call_id = f"{next(self._call_ids):x}"
        loop = asyncio.get_running_loop()
        pending = _Pending(future=loop.create_future())
        self._pending[call_id] = pending
        headers = CallHeaders(
            call_id=call_id,
            reply=self.subjects.reply(self.router_id, call_id),
            content_type=content_type,
            accept_by=time.time() + startup_timeout_s,
            timeout_s=timeout_s,
            method=method,
            request_id=request_id,
            generation=generation,
        )
        accepted = asyncio.ensure_future(pending.accepted.wait())
        try:
            # The PubAck and the reply race: waiting for the ack first would add a round trip
            # to every call, so the ack is checked alongside; a failed publish answers at once.
            ack = asyncio.ensure_future(
                self.js.publish(
                    self.subjects.calls(function_id), body, headers=headers.to_headers()
                )
            )
            ack.add_done_callback(_observe)
            await self._hint_demand(function_id)
            done, _ = await asyncio.wait(
                {ack, accepted}, timeout=startup_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if ack in done and not accepted.done() and ack.exception() is not None:
                raise Unavailable(
                    "the call queue did not accept the call", retry_after=1
                ) from ack.exception()
            if not accepted.done():
                remaining = headers.accept_by - time.time()
                await asyncio.wait({accepted}, timeout=max(0.0, remaining))
            if not accepted.done():
                raise FunctionTimeout(
                    f"no replica took the call within the function's startup_timeout "
                    f"({startup_timeout_s:g} s)"
                )
            try:
                return await asyncio.wait_for(
                    asyncio.shield(pending.future), timeout_s + _REPLY_GRACE_S
                )
            except TimeoutError:
                raise FunctionTimeout(
                    f"the call did not finish within the function's timeout ({timeout_s:g} s)"
                ) from None
        finally:
            accepted.cancel()
            self._pending.pop(call_id, None)

    async def _hint_demand(self, function_id: uuid.UUID) -> None:
        """Wake the scheduler (scale from zero without waiting for its next pass). Once per
        function per interval is enough: the queue itself carries the exact demand."""
        now = time.monotonic()
        if now - self._hinted.get(function_id, 0.0) >= _HINT_INTERVAL_S:
            self._hinted[function_id] = now
            await self.nc.publish(self.subjects.demand(function_id), b"")

    def _on_reply_event(self, pending: _Pending, msg: Msg) -> None:
        headers = msg.headers or {}
        event = headers.get(H.EVENT)
        if event == Event.ACCEPTED:
            pending.replica_id = headers.get(H.REPLICA)
            if pending.replica_id:
                # It just spoke: alive now, even if none of its heartbeats reached us yet.
                self._last_seen[uuid.UUID(pending.replica_id).hex] = time.monotonic()
            pending.accepted.set()
            return
        pending.accepted.set()
        if pending.future.done():
            return
        if event == Event.RESULT:
            pending.future.set_result(
                CallResult(
                    body=msg.data,
                    content_type=headers.get(H.CONTENT_TYPE, "application/json"),
                    replica_id=headers.get(H.REPLICA, ""),
                )
            )
        else:
            pending.future.set_exception(_remote_error(msg.data))

    async def _on_reply(self, msg: Msg) -> None:
        call_id = msg.subject.rsplit(".", 1)[-1]
        pending = self._pending.get(call_id)
        if pending is not None:
            self._on_reply_event(pending, msg)

    async def _on_heartbeat(self, msg: Msg) -> None:
        self._last_seen[msg.subject.rsplit(".", 1)[-1]] = time.monotonic()

    async def _watch(self) -> None:
        """Fail the calls of replicas that stopped heartbeating; forget long-gone replicas."""
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S / 2)
            now = time.monotonic()
            if not self.nc.is_connected:
                # Our own link is down, not the replicas: give everyone a fresh start.
                for key in self._last_seen:
                    self._last_seen[key] = now
                continue
            for pending in list(self._pending.values()):
                replica = pending.replica_id
                if replica is None or pending.future.done():
                    continue
                seen = self._last_seen.get(uuid.UUID(replica).hex)
                if seen is not None and now - seen > REPLICA_LOST_AFTER_S:
                    pending.future.set_exception(
                        WorkerLost(f"replica {replica} stopped responding during the call")
                    )
            for replica, seen in list(self._last_seen.items()):
                if now - seen > 60:
                    del self._last_seen[replica]


def _observe(future: asyncio.Future[Any]) -> None:
    """Mark a late PubAck failure as seen: once a replica accepted the call it is moot."""
    if not future.cancelled():
        future.exception()


def _remote_error(data: bytes) -> KilnError:
    try:
        error = json.loads(data)
        cls = _REMOTE_ERRORS.get(error["code"], InternalError)
        return cls(str(error["message"]))
    except (ValueError, KeyError, TypeError):
        return InternalError("a replica sent an unreadable error")

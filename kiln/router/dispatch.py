"""The router's side of NATS dispatch: publish a call into the function's work queue, wait for
the replica's reply on this router's inbox, and notice a replica that dies mid-call.

One subscription serves every call: JetStream's PubAck and the replica's reply both arrive on
`ns.reply.<router>.<call>` and are routed to the waiting request by call id; replicas say which
calls they took on `ns.accepted.<router>`, several per message. A call is a future and one timer
(the deadline of its phase: confirmed by JetStream, taken by a replica, answered), so the warm
path creates no tasks. Each replica heartbeats every second; a call whose replica has been
silent for `REPLICA_LOST_AFTER_S` fails with `worker_lost` at once instead of waiting for its
deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import itertools
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from kiln._jetstream import MSG_ID, PUBLISH_RETRY_S, publish_durably
from kiln._nats import reconnect_delay
from kiln.db.enums import ReplicaState
from kiln.errors import (
    FunctionError,
    FunctionTimeout,
    InternalError,
    InvalidArguments,
    KilnError,
    ResultTooLarge,
    StreamBroken,
    Unavailable,
    UnserializableResult,
    WorkerLost,
)
from kiln.payloads import PayloadStore
from kiln.router.call_order import CallOrder, CallTrace
from kiln.router.streams import STREAM_WINDOW, CallAbandoned, CallStream
from kiln.seal import Seals
from kiln.wire import (
    HEARTBEAT_INTERVAL_S,
    JOB_ROUTER,
    REPLICA_LOST_AFTER_S,
    SESSION_WINDOW,
    CallHeaders,
    Event,
    H,
    ReplicaHeartbeat,
    StreamControl,
    Subjects,
    decode_own,
    encode,
    parse_event,
    stream_event,
)

__all__ = ["CallResult", "Dispatcher"]

_log = logging.getLogger(__name__)

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
        StreamBroken,
    )
}
_CALL_EVENTS = (Event.RESULT, Event.ERROR)
# A job waits in the queue as long as the calls stream keeps messages (its max_age).
_JOB_WAITS_S = 24 * 3600.0
# After a replica accepted a call it has `timeout` to answer; this covers the reply's trip.
_REPLY_GRACE_S = 2.0
_HINT_INTERVAL_S = 0.25
# A ready replica's heartbeat vouches for its function this long (a few missed beats).
_SERVING_FOR_S = REPLICA_LOST_AFTER_S
# JetStream confirms a stored call within milliseconds; no confirmation at all means it is down.
_PUBACK_WAIT_S = 5.0
# After publishing a call again: how long to wait for that attempt's PubAck.
_REPUBLISH_WAIT_S = 2.0
# A replica idle this long while a call it took has no answer: the answer was lost.
_ANSWER_LOST_AFTER_S = REPLICA_LOST_AFTER_S
# How often a session on a pod's replica is opened again until the replica says it took it.
_POD_OPEN_AGAIN_S = 0.5
_HEADER_ROOM = 8 * 1024


@dataclass
class CallResult:
    body: bytes
    content_type: str


class _Phase(enum.Enum):
    PUBLISHED = "published"  # waiting for JetStream's PubAck
    QUEUED = "queued"  # stored; waiting for a replica to take it
    RUNNING = "running"  # a replica took it; waiting for the reply


class _Call:
    """One call in flight: a future for the answer and one timer. Each phase has its own
    deadline, but the timer moves only when a phase's deadline is earlier than the one it is
    set for; when it fires early it re-arms itself for what is left. So a call that finishes
    quickly arms and cancels one timer, whatever phases it went through."""

    __slots__ = (
        "accept_by", "answered", "deadline", "function", "future", "idle_seen", "on_unconfirmed",
        "phase",
        "publish", "publish_attempts", "publish_until", "published_at", "replica_hex",
        "replica_id", "startup_timeout_s", "stream", "timeout_s", "timer", "timer_at", "token",
        "trace",
    )  # fmt: skip

    def __init__(
        self,
        future: asyncio.Future[CallResult],
        headers: CallHeaders,
        startup_s: float,
        function: str,
    ) -> None:
        self.future = future
        self.function = function  # its id in hex: only its replicas may answer
        self.token = headers.token  # only the replica that took it knows this
        self.phase = _Phase.PUBLISHED
        self.replica_id: str | None = None
        self.replica_hex = ""  # the same, as the index of calls by replica keys it
        self.answered = False  # its reply came (a stored result may still be fetched)
        self.idle_seen = 0.0  # when its replica first said it runs nothing, since it took it
        self.accept_by = headers.accept_by
        self.timeout_s = headers.timeout_s
        self.startup_timeout_s = startup_s
        self.deadline = 0.0  # loop time when the current phase runs out
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.published_at = future.get_loop().time()
        self.stream: CallStream | None = None
        self.trace: CallTrace | None = None
        # Until JetStream confirms it: what to publish again (subject, body, reply, headers),
        # until when, and who does it (a stream leader election, a reconnect).
        self.publish: tuple[str, bytes, str, dict[str, str]] | None = None
        self.publish_until = 0.0
        self.publish_attempts = 0
        self.on_unconfirmed: Callable[[_Call], None] = _give_up

    def fail(self, error: KilnError) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def on_timer(self) -> None:
        self.timer = None
        left = self.deadline - self.future.get_loop().time()
        if left > 0.001:
            self._arm_at(self.deadline)
            return
        if self.phase is _Phase.PUBLISHED:
            self.on_unconfirmed(self)
        elif self.phase is _Phase.QUEUED:
            self.fail(FunctionTimeout(
                f"no replica took the call within the function's startup_timeout "
                f"({self.startup_timeout_s:g} s)"
            ))  # fmt: skip
        else:
            self.fail(FunctionTimeout(
                f"the call did not finish within the function's timeout ({self.timeout_s:g} s)"
            ))  # fmt: skip

    def enter(self, phase: _Phase, deadline_s: float) -> None:
        """Move to `phase` with a deadline `deadline_s` from now; phases only move forward."""
        if _ORDER[phase] <= _ORDER[self.phase]:
            return
        self.phase = phase
        self.set_deadline(deadline_s)

    def set_deadline(self, deadline_s: float) -> None:
        self.deadline = self.future.get_loop().time() + max(0.0, deadline_s)
        if self.timer is None or self.deadline < self.timer_at:
            self._arm_at(self.deadline)

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _arm_at(self, when: float) -> None:
        self.cancel_timer()
        self.timer_at = when
        self.timer = self.future.get_loop().call_at(when, self.on_timer)


_ORDER = {_Phase.PUBLISHED: 0, _Phase.QUEUED: 1, _Phase.RUNNING: 2}


def _give_up(call: _Call) -> None:
    call.fail(Unavailable("the call queue did not confirm the call", retry_after=1))


class Dispatcher:
    def __init__(self, nc: NATS, subjects: Subjects, *, seals: Seals, stream_replicas: int) -> None:
        """`seals`: what calls and demand hints are sealed with, and heartbeats checked
        with (kiln.seal). `stream_replicas`: copies of the payload buckets it makes."""
        self.nc = nc
        self.subjects = subjects
        self.seals = seals
        self.router_id = secrets.token_hex(6)
        self._calls: dict[str, _Call] = {}
        # (function id, replica id), both hex -> when the replica last spoke
        self._last_seen: dict[tuple[str, str], float] = {}
        self._hinted: dict[uuid.UUID, float] = {}
        # function id (hex) -> its ready replicas (id hex) -> their last heartbeat
        self._ready: dict[str, dict[str, float]] = {}
        self._call_ids = itertools.count(1)
        self._subscriptions: list[Subscription] = []
        self._watchdog: asyncio.Task[None] | None = None
        # Calls abandoned before a replica took them: told to stop once one does.
        self._abandoned: dict[str, tuple[str, float]] = {}  # call id -> (function, when)
        self._controls: set[asyncio.Task[None]] = set()
        # replica id (hex) -> the plain calls it took from us and has not answered yet
        self._running_on: dict[str, set[str]] = {}
        self.payloads = PayloadStore(nc.jetstream(), subjects, replicas=stream_replicas)

    @property
    def max_body_bytes(self) -> int:
        """The largest call body one NATS message carries (its max_payload, less room for
        headers); larger ones travel through the payload object store."""
        return max(1024, int(self.nc.max_payload) - _HEADER_ROOM)

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    async def start(self) -> None:
        self._subscriptions = [
            await self.nc.subscribe(self.subjects.replies(self.router_id), cb=self._on_reply),
            await self.nc.subscribe(
                self.subjects.all_accepted(self.router_id), cb=self._on_accepted
            ),
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
        for call in list(self._calls.values()):
            call.fail(Unavailable("the router is shutting down", retry_after=1))

    async def submit(self, order: CallOrder, body: bytes) -> asyncio.Future[CallResult]:
        """Put a call into the function's queue; the future holds its result or its error
        (a KilnError). Cancelling the future (or failing it with `CallAbandoned`) abandons
        the call: its replica is told to stop."""
        return (await self._publish(order, body, window=0)).future

    async def open_stream(
        self, order: CallOrder, body: bytes, *, window: int = STREAM_WINDOW
    ) -> CallStream:
        """Put a call of a generator into the function's queue; its chunks arrive in the
        returned stream, at most `window` ahead of the reader."""
        call = await self._publish(order, body, window=window)
        assert call.stream is not None
        return call.stream

    async def enqueue_job(
        self,
        function_id: uuid.UUID,
        job_id: str,
        body: bytes,
        *,
        content_type: str,
        method: str | None,
        timeout_s: float,
        request_id: str,
        generation: int = 0,
        payload: str | None = None,
    ) -> None:
        """Store a job in the function's queue (raises Unavailable if JetStream does not
        confirm it). Its id is the message id, so a repeated publish is stored once."""
        headers = CallHeaders(
            call_id=job_id,
            router=JOB_ROUTER,
            content_type=content_type,
            accept_by=time.time() + _JOB_WAITS_S,
            timeout_s=timeout_s,
            method=method,
            request_id=request_id,
            generation=generation,
            payload=payload,
        ).to_headers()
        headers[MSG_ID] = job_id
        subject = self.subjects.calls(function_id)
        self._seal(function_id, subject, headers)
        try:
            # Through a leader election or a reconnect: the job id deduplicates retries.
            await publish_durably(self.nc.jetstream(), subject, body, headers=headers)
        except Exception as exc:  # noqa: BLE001 - NATS down, or the stream refused it
            _log.warning("storing job %s failed: %s", job_id, exc)
            raise Unavailable("the job queue did not accept the job", retry_after=1) from None
        await self._hint_demand(function_id)

    async def open_session(self, order: CallOrder, body: bytes) -> CallStream:
        """Put a WebSocket session into the function's queue: the replica's frames arrive in
        the returned stream; `send_frame` carries the client's."""
        call = await self._publish(order, body, window=SESSION_WINDOW)
        assert call.stream is not None
        return call.stream

    async def open_pod_session(
        self, order: CallOrder, body: bytes, replica_id: uuid.UUID
    ) -> CallStream:
        """Open a session (a terminal) on a pod's replica, which takes nothing from its
        function's queue: the call goes to the replica itself, again every
        `_POD_OPEN_AGAIN_S` until it says it took it (it may still be starting), up to the
        order's startup timeout."""
        call = await self._publish(order, body, window=SESSION_WINDOW, replica_id=replica_id)
        assert call.stream is not None
        return call.stream

    async def send_frame(self, stream: CallStream, kind: Event, seq: int, data: bytes) -> None:
        """One of the client's frames (or its close) to the replica holding the session."""
        assert stream.replica_id is not None
        subject = self.subjects.session_frames(
            uuid.UUID(stream.replica_id), self.router_id, stream.call_id
        )
        await self.nc.publish(subject, data, headers=stream_event(kind, seq))

    async def _publish(
        self, order: CallOrder, body: bytes, *, window: int, replica_id: uuid.UUID | None = None
    ) -> _Call:
        # Unique within this router, whose id is in the reply subject; a counter spares the
        # urandom system call that uuid4 makes on every request.
        call_id = f"{next(self._call_ids):x}"
        headers = CallHeaders(
            call_id=call_id,
            token=secrets.token_hex(8),
            router=self.router_id,
            content_type=order.content_type,
            accept_by=time.time() + order.startup_timeout_s,
            timeout_s=order.timeout_s,
            method=order.method,
            request_id=order.request_id,
            generation=order.generation,
            window=window,
        )
        future: asyncio.Future[CallResult] = asyncio.get_running_loop().create_future()
        call = _Call(future, headers, order.startup_timeout_s, order.function_id.hex)
        if order.trace is not None:
            order.trace.call_id = call_id
            call.trace = order.trace
        if len(body) > self.max_body_bytes:
            try:
                headers = dataclasses.replace(
                    headers, payload=await self.payloads.put(order.function_id, body)
                )
            except Exception as exc:  # noqa: BLE001 - the store is NATS: down or full
                _log.warning("storing the body of call %s failed: %s", call_id, exc)
                raise Unavailable("the payload store is unreachable", retry_after=1) from None
            body = b""
        if window:
            call.stream = CallStream(
                future,
                router=self.router_id,
                call_id=call_id,
                window=window,
                send_control=functools.partial(self._control, call),
            )
        self._calls[call_id] = call
        future.add_done_callback(functools.partial(self._forget, call_id))
        if replica_id is not None:
            return self._open_on(call, order.function_id, body, headers, replica_id)
        call.set_deadline(min(_PUBACK_WAIT_S, order.startup_timeout_s))
        # A plain publish whose reply subject is our inbox: the PubAck arrives like any
        # reply, without the per-request inbox, future and timer of a JetStream request.
        subject = self.subjects.calls(order.function_id)
        sealed = self._seal(order.function_id, subject, headers.to_headers())
        sealed[MSG_ID] = f"{self.router_id}.{call_id}"  # a publish retried is stored once
        reply = self.subjects.reply(self.router_id, order.function_id, call_id, call.token)
        call.publish = (subject, body, reply, sealed)
        call.publish_until = call.published_at + min(PUBLISH_RETRY_S, order.startup_timeout_s)
        call.on_unconfirmed = self._unconfirmed
        try:
            await self.nc.publish(subject, body, reply=reply, headers=sealed)
            await self._hint_demand(order.function_id)
        except Exception as exc:  # noqa: BLE001 - NATS down or closing: the caller may retry
            call.fail(Unavailable("the call queue is unreachable", retry_after=1))
            _log.warning("publishing call %s failed: %s", call_id, exc)
        return call

    def _open_on(
        self,
        call: _Call,
        function_id: uuid.UUID,
        body: bytes,
        call_headers: CallHeaders,
        replica_id: uuid.UUID,
    ) -> _Call:
        subject = self.subjects.pod_sessions(replica_id)
        headers = self._seal(function_id, subject, call_headers.to_headers())
        call.phase = _Phase.QUEUED  # nothing stores it: it waits for the replica to say so
        call.set_deadline(call.accept_by - time.time())
        loop = asyncio.get_running_loop()

        def again() -> None:
            if call.future.done() or call.phase is not _Phase.QUEUED:
                return
            task = asyncio.ensure_future(self.nc.publish(subject, body, headers=headers))
            self._controls.add(task)
            task.add_done_callback(self._controls.discard)
            loop.call_later(_POD_OPEN_AGAIN_S, again)

        again()
        return call

    def _unconfirmed(self, call: _Call) -> None:
        """JetStream refused the call for now (no responders, 503) or did not answer: publish
        it again after a pause, with the same message id, until the call's publish window
        closes (a stream leader election, a reconnect); then the caller hears "retry"."""
        loop = asyncio.get_running_loop()
        call.publish_attempts += 1
        pause = reconnect_delay(call.publish_attempts)
        if call.publish is None or loop.time() + pause >= call.publish_until:
            _give_up(call)
            return
        # The attempt's own deadline: its timer brings us back here if it goes unanswered.
        call.set_deadline(pause + _REPUBLISH_WAIT_S)
        loop.call_later(pause, self._republish, call)

    def _republish(self, call: _Call) -> None:
        if call.future.done() or call.phase is not _Phase.PUBLISHED or call.publish is None:
            return
        subject, body, reply, headers = call.publish
        task = asyncio.ensure_future(self.nc.publish(subject, body, reply=reply, headers=headers))
        self._controls.add(task)

        def sent(task: asyncio.Future[None]) -> None:
            self._controls.discard(task)
            if not task.cancelled() and task.exception() is not None:
                self._unconfirmed(call)  # not even sent (the connection is closing): again

        task.add_done_callback(sent)

    def _seal(
        self, function_id: uuid.UUID, subject: str, headers: dict[str, str]
    ) -> dict[str, str]:
        """`headers` with the seal that tells the function's replicas a router sent the call."""
        seal = self.seals.function(function_id, subject, headers[H.CALL].encode())
        if seal is not None:
            headers.update(seal)
        return headers

    def _forget(self, call_id: str, future: asyncio.Future[CallResult]) -> None:
        call = self._calls.pop(call_id, None)
        if call is None:
            return
        call.cancel_timer()
        running = self._running_on.get(call.replica_hex)
        if running is not None:
            running.discard(call_id)
            if not running:
                del self._running_on[call.replica_hex]
        # Given up before JetStream confirmed it: it may be stored all the same, and a replica
        # that takes it later must be told to drop it (its caller was told to retry).
        unconfirmed = call.phase is _Phase.PUBLISHED
        if future.cancelled() or unconfirmed or isinstance(future.exception(), CallAbandoned):
            if call.replica_id is None:
                self._abandoned[call_id] = (call.function, time.monotonic())
            else:
                self._control(call, StreamControl(self.router_id, call_id, cancel=True))

    def _control(self, call: _Call, control: StreamControl) -> None:
        """Send a replica word about a call it runs (not yet known: `_on_accepted` resends)."""
        if call.replica_id is None:
            return
        subject = self.subjects.replica_control(uuid.UUID(call.replica_id))
        task = asyncio.ensure_future(self.nc.publish(subject, encode(control)))
        self._controls.add(task)
        task.add_done_callback(self._controls.discard)

    async def wake_scheduler(self, function_id: uuid.UUID | None) -> None:
        """A pod of the function wants its replica (or gave it back): a pass now, not at the
        scheduler's next period (None: an ended pod whose app is gone, nothing to do)."""
        if function_id is None:
            return
        subject = self.subjects.demand(function_id)
        await self.nc.publish(subject, b"", headers=self.seals.platform(subject, b""))

    async def _hint_demand(self, function_id: uuid.UUID) -> None:
        """Wake the scheduler when the function has no ready replica (scale from zero without
        waiting for its next pass). Once per function per interval is enough, and none while a
        replica serves it: the queue itself carries the exact demand, which the scheduler's
        periodic pass reads, and every hint costs it a reconcile pass."""
        now = time.monotonic()
        ready = self._ready.get(function_id.hex)
        if ready and any(now - seen < _SERVING_FOR_S for seen in ready.values()):
            return
        if now - self._hinted.get(function_id, 0.0) >= _HINT_INTERVAL_S:
            self._hinted[function_id] = now
            subject = self.subjects.demand(function_id)
            await self.nc.publish(subject, b"", headers=self.seals.platform(subject, b""))

    async def _on_reply(self, msg: Msg) -> None:
        _, function, call_id, token = msg.subject.rsplit(".", 3)
        call = self._calls.get(call_id)
        if call is None or call.function != function or call.token != token:
            return  # not ours, or not from the replica that took the call
        headers = msg.headers
        event = headers.get(H.EVENT) if headers else None
        if event is None:
            self._on_puback(call, msg.data, headers.get("Status") if headers else None)
        elif call.stream is not None and event not in _CALL_EVENTS:
            kind, seq = parse_event(event)  # "chunk 7", "end 12", "text 3", "credit 64"
            assert headers is not None
            stored = headers.get(H.PAYLOAD)
            body = msg.data if stored is None else self._take(call, stored)
            call.stream.on_event(kind, seq, body)
        elif event == Event.RESULT:
            assert headers is not None
            call.answered = True
            content_type = headers.get(H.CONTENT_TYPE, "application/json")
            stored = headers.get(H.PAYLOAD)
            if stored is not None:
                self._finish_stored(call, self._take(call, stored), content_type)
            elif not call.future.done():
                call.future.set_result(CallResult(body=msg.data, content_type=content_type))
        else:
            call.answered = True
            call.fail(_remote_error(msg.data))

    def _take(self, call: _Call, name: str) -> asyncio.Future[bytes]:
        """Fetch a stored payload (from the call's function's bucket, whatever the reply
        says) without holding up the other replies meanwhile."""
        return asyncio.ensure_future(self.payloads.take(uuid.UUID(call.function), name))

    def _finish_stored(self, call: _Call, body: asyncio.Future[bytes], content_type: str) -> None:
        def done(fetched: asyncio.Future[bytes]) -> None:
            if call.future.done():
                return
            if fetched.exception() is not None:
                _log.warning("fetching a stored result failed: %s", fetched.exception())
                call.fail(InternalError("the result could not be fetched from the payload store"))
                return
            call.future.set_result(CallResult(fetched.result(), content_type))

        body.add_done_callback(done)

    def _on_puback(self, call: _Call, data: bytes, status: str | None) -> None:
        if data.startswith(b'{"stream":') and b'"error"' not in data:
            # Stored; spares the JSON parse on every call (refusals carry an "error" object).
            call.publish = None
            call.enter(_Phase.QUEUED, call.accept_by - time.time())
            return
        if call.phase is not _Phase.PUBLISHED:
            return
        if status == "503":  # no responders: the stream has no leader just now
            call.on_unconfirmed(call)
            return
        try:
            ack = json.loads(data)
        except ValueError:
            ack = {"error": {"description": "unreadable PubAck"}}
        if isinstance(ack, dict) and "error" not in ack:
            call.publish = None
            call.enter(_Phase.QUEUED, call.accept_by - time.time())
            return
        error = ack.get("error") if isinstance(ack, dict) else None
        if isinstance(error, dict) and error.get("code") == 503:  # JetStream not ready yet
            call.on_unconfirmed(call)
            return
        _log.warning("JetStream refused a call: %s", ack)
        call.fail(Unavailable("the call queue did not accept the call", retry_after=1))

    async def _on_accepted(self, msg: Msg) -> None:
        function = msg.subject.rsplit(".", 1)[-1]  # a replica may publish only its function's
        try:
            accepted = json.loads(msg.data)
            replica, call_ids = str(accepted["replica"]), list(accepted["calls"])
            tokens = [str(token) for token in accepted["tokens"]]
            replica_hex = uuid.UUID(replica).hex
            ready_at = float(accepted.get("ready_at") or 0.0)
        except (ValueError, KeyError, TypeError):
            _log.warning("ignoring an unreadable accepted message")
            return
        for call_id, token in zip(call_ids, tokens, strict=False):
            call = self._calls.get(call_id)
            if call is not None and call.function == function and call.token == token:
                # It just spoke: alive now, even if none of its heartbeats reached us yet.
                self._last_seen[(function, replica_hex)] = time.monotonic()
                call.replica_id, call.replica_hex = replica, replica_hex
                if call.stream is None:
                    self._running_on.setdefault(replica_hex, set()).add(call_id)
                if call.trace is not None:
                    now = call.future.get_loop().time()
                    trace = call.trace
                    trace.replica_id, trace.taken_at = replica, now
                    trace.queue_wait_s = now - call.published_at
                    # Published (wall clock) before its replica was ready: it waited for a
                    # cold start.
                    trace.cold = ready_at > call.accept_by - call.startup_timeout_s
                call.enter(_Phase.RUNNING, call.timeout_s + _REPLY_GRACE_S)
                if call.stream is not None:
                    call.stream.on_taken(replica)
            elif self._abandoned.get(call_id, ("", 0.0))[0] == function:
                del self._abandoned[call_id]
                # Its caller left while it waited: the replica that took it should not run it.
                stop = StreamControl(self.router_id, call_id, cancel=True)
                await self.nc.publish(
                    self.subjects.replica_control(uuid.UUID(replica)), encode(stop)
                )

    def _replies_lost(self, replica: str, now: float) -> None:
        """The replica says it runs nothing, yet calls it took from us have no answer. A
        replica sends a call's answer before the heartbeat that no longer counts the call, on
        one connection; but this client hands each subscription's messages to its own task,
        so an answer may still wait behind the heartbeat here. Once the replica has said so
        for `_ANSWER_LOST_AFTER_S`, the answer was lost on the way (a NATS server between us
        died, or our own link was coming back): the caller hears so, not at the deadline."""
        for call_id in list(self._running_on.get(replica, ())):
            call = self._calls.get(call_id)
            if call is None or call.phase is not _Phase.RUNNING or call.answered:
                continue
            if not call.idle_seen:
                call.idle_seen = now
            elif now - call.idle_seen >= _ANSWER_LOST_AFTER_S:
                call.fail(WorkerLost(
                    "the call's answer was lost on its way back (a NATS server or link went "
                    "down meanwhile); the call ran, and may be retried"
                ))  # fmt: skip

    async def _on_heartbeat(self, msg: Msg) -> None:
        now = time.monotonic()
        try:
            beat = decode_own(ReplicaHeartbeat, msg.subject, msg.data)
            function_id = uuid.UUID(beat.function_id)
        except (ValueError, TypeError, KeyError):
            return
        # Sealed by a replica of the function it names: what it says counts for that
        # function's calls and replicas only.
        if not self.seals.function_sent(msg, function_id, "a replica heartbeat"):
            return
        function, replica = function_id.hex, uuid.UUID(beat.replica_id).hex
        self._last_seen[(function, replica)] = now
        if beat.in_flight == 0 and replica in self._running_on:
            self._replies_lost(replica, now)
        ready = self._ready.setdefault(function, {})
        if beat.state == ReplicaState.READY and beat.pod_id is None:  # a pod's takes no calls
            ready[replica] = now
        else:  # draining or gone: it vouches for its function no longer
            ready.pop(replica, None)

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
            for call in list(self._calls.values()):
                replica = call.replica_id
                if replica is None or call.future.done():
                    continue
                seen = self._last_seen.get((call.function, uuid.UUID(replica).hex))
                if seen is not None and now - seen > REPLICA_LOST_AFTER_S:
                    call.fail(WorkerLost(f"replica {replica} stopped responding during the call"))
            for speaker, seen in list(self._last_seen.items()):
                if now - seen > 60:
                    del self._last_seen[speaker]
            for call_id, (_, abandoned_at) in list(self._abandoned.items()):
                if now - abandoned_at > 3600:  # past any startup_timeout: nobody will take it
                    del self._abandoned[call_id]
            for function, replicas in list(self._ready.items()):
                for replica, seen in list(replicas.items()):
                    if now - seen > 60:
                        del replicas[replica]
                if not replicas:
                    del self._ready[function]


def _remote_error(data: bytes) -> KilnError:
    try:
        error = json.loads(data)
        cls = _REMOTE_ERRORS.get(error["code"], InternalError)
        param = error.get("param")
        if isinstance(param, str):
            return cls(str(error["message"]), param=param)
        return cls(str(error["message"]))
    except (ValueError, KeyError, TypeError):
        return InternalError("a replica sent an unreadable error")

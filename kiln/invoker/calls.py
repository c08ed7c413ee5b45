"""Running the calls a replica took: a plain call (one reply), a generator (a stream of
chunks) or a WebSocket session (frames both ways), each answered on its router's reply
subject; and the routers' words about calls in progress (stream credit, cancel, session
frames). The replica (`kiln.invoker.replica`) decides which calls to take; this runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterator

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from kiln.errors import (
    FunctionError,
    FunctionTimeout,
    InvalidArguments,
    KilnError,
    ResultTooLarge,
)
from kiln.functions.session import Session, SessionClosed
from kiln.functions.spec import CallKind, FunctionSpec
from kiln.invoker.output import in_call
from kiln.invoker.sessions import ReplicaSession
from kiln.invoker.streams import StreamCredits, send_stream
from kiln.invoker.target import Encoded, Target
from kiln.payloads import MAX_RESULT_BYTES, PayloadStore
from kiln.wire import CallHeaders, Event, H, StreamControl, Subjects, decode, parse_event

__all__ = ["CallRunner"]

_log = logging.getLogger("kiln.replica")
_HEADER_ROOM = 8 * 1024
_JSON = "application/json"
_RESULT_JSON: dict[str, str] = {H.EVENT: Event.RESULT}

_Key = tuple[str, str]  # (router, call id): what routers' messages refer to
SessionHandler = Callable[[Session], Awaitable[None]]


class CallRunner:
    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        spec: FunctionSpec,
        replica_id: uuid.UUID,
        target: Target | None,
        *,
        function_id: uuid.UUID,
        on_poison: Callable[[str], None],
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.spec = spec
        self.replica_id = replica_id
        self.target = target  # None in a pod's replica: it runs sessions of its own handlers
        self.on_poison = on_poison
        self.function_id = function_id
        # Its node agent made the function's payload bucket; a replica may not create one.
        self.payloads = PayloadStore(nc.jetstream(), subjects, replicas=None)
        self._running: dict[_Key, asyncio.Task[None]] = {}
        self._cancelled: set[_Key] = set()
        self._credits: dict[_Key, StreamCredits] = {}
        self._sessions: dict[_Key, ReplicaSession] = {}
        self._replica_str = str(replica_id)

    async def start(self) -> None:
        """Listen for the routers' stream controls and session frames."""
        await self.nc.subscribe(self.subjects.replica_control(self.replica_id), cb=self._on_control)
        await self.nc.subscribe(
            self.subjects.all_session_frames(self.replica_id), cb=self._on_session_frame
        )

    async def run(self, call: CallHeaders, body: bytes) -> None:
        """Run one call the replica took, until it is answered or its caller cancels it."""
        key = (call.router, call.call_id)
        with self.cancellable(key), in_call(f"{call.router}-{call.call_id}", call.request_id):
            try:
                if call.payload is not None:
                    try:
                        body = await self.payloads.take(self.function_id, call.payload)
                    except Exception as exc:  # noqa: BLE001 - expired, or NATS trouble
                        _log.error("call %s: its stored body is gone: %s", call.call_id, exc)
                        await self.reply_error(
                            call, InvalidArguments("the call's stored body could not be read")
                        )
                        return
                entry = self.spec.entry(call.method)
                kind = entry.kind if entry is not None else CallKind.FUNCTION
                if kind is CallKind.GENERATOR and call.window > 0:
                    await self._stream(call, body)
                elif kind is CallKind.WEBSOCKET and call.window > 0:
                    await self._session(call, body)
                else:
                    await self._call(call, body)
            except asyncio.CancelledError:
                if not self.cancelled_by_caller(key):
                    raise  # not the caller's cancel: the replica is stopping
                _log.info("call %s cancelled: its caller left", call.call_id)

    @contextlib.contextmanager
    def cancellable(self, key: _Key) -> Iterator[None]:
        """While inside, a router's cancel for `key` cancels the current task (then
        `cancelled_by_caller(key)` tells that CancelledError from a shutdown)."""
        task = asyncio.current_task()
        assert task is not None
        self._running[key] = task
        try:
            yield
        finally:
            self._running.pop(key, None)
            self._cancelled.discard(key)

    def cancelled_by_caller(self, key: _Key) -> bool:
        if key in self._cancelled:
            self._cancelled.discard(key)
            return True
        return False

    async def compute(self, call: CallHeaders, body: bytes) -> Encoded:
        """Run a plain call under its timeout: its encoded result, or a KilnError to send (the
        customer's exception as FunctionError)."""
        assert self.target is not None
        deadline = asyncio.timeout(call.timeout_s)
        try:
            async with deadline:
                result = await self.target.call(call.method, body, call.content_type)
        except TimeoutError as exc:
            if not deadline.expired():  # the user's own TimeoutError
                raise FunctionError(_user_error_reason(call, exc)) from None
            entry = self.spec.entry(call.method)
            if entry is None or not entry.is_async:
                self.on_poison("a sync call overran its timeout; its thread cannot be stopped")
            raise FunctionTimeout(
                f"the call did not finish within the function's timeout ({call.timeout_s:g} s)"
            ) from None
        except KilnError:
            raise
        except Exception as exc:  # noqa: BLE001 - the customer's code may raise anything
            raise FunctionError(_user_error_reason(call, exc)) from None
        if len(result.body) > MAX_RESULT_BYTES:
            raise ResultTooLarge(
                f"the result has {len(result.body)} bytes; results are limited to "
                f"{MAX_RESULT_BYTES} bytes"
            )
        return result

    # The three kinds of call -------------------------------------------------------------------

    async def _call(self, call: CallHeaders, body: bytes) -> None:
        try:
            result = await self.compute(call, body)
        except KilnError as exc:
            await self.reply_error(call, exc)
            return
        # The router knows the replica from the accepted message and takes JSON for granted:
        # every header costs a parse on the router's hot path.
        headers = (
            _RESULT_JSON
            if result.content_type == _JSON
            else {H.EVENT: Event.RESULT, H.CONTENT_TYPE: result.content_type}
        )
        body = result.body
        try:
            if len(body) > int(self.nc.max_payload) - _HEADER_ROOM:
                headers = {**headers, H.PAYLOAD: await self.payloads.put(self.function_id, body)}
                body = b""
            await self.nc.publish(self.reply_subject(call), body, headers=headers)
        except Exception as exc:  # noqa: BLE001 - tell the caller rather than leave it waiting
            _log.error("could not send the result of call %s: %s", call.call_id, exc)
            await self.reply_error(call, FunctionError(f"the result could not be sent: {exc}"))

    async def _stream(self, call: CallHeaders, body: bytes) -> None:
        """Run a generator and stream what it yields; its timeout covers the whole stream."""
        assert self.target is not None
        key = (call.router, call.call_id)
        credits = self._credits[key] = StreamCredits(call.window)
        deadline = asyncio.timeout(call.timeout_s)
        try:
            async with deadline:
                await send_stream(
                    self.nc,
                    self.reply_subject(call),
                    self.target.stream(call.method, body, call.content_type),
                    credits,
                    store=functools.partial(self.payloads.put, self.function_id),
                    inline_bytes=int(self.nc.max_payload) - _HEADER_ROOM,
                )
        except TimeoutError as exc:
            if not deadline.expired():
                await self._reply_user_error(call, exc)
                return
            await self.reply_error(call, FunctionTimeout(
                f"the stream did not finish within the function's timeout ({call.timeout_s:g} s)"
            ))  # fmt: skip
        except KilnError as exc:
            await self.reply_error(call, exc)
        except Exception as exc:  # noqa: BLE001 - the customer's code may raise anything
            await self._reply_user_error(call, exc)
        finally:
            self._credits.pop(key, None)

    def open_session(self, call: CallHeaders, body: bytes) -> ReplicaSession:
        """The session of `call`, ready for the client's frames (a pod's replica opens it
        before it tells the router it took the call, so no early frame is dropped)."""
        key = (call.router, call.call_id)
        try:
            params = json.loads(body or b"{}").get("params", {})
        except (ValueError, AttributeError):
            params = {}
        credits = self._credits[key] = StreamCredits(call.window)
        session = self._sessions[key] = ReplicaSession(
            self.nc,
            self.reply_subject(call),
            credits=credits,
            params={str(k): str(v) for k, v in params.items()},
        )
        return session

    async def run_session(
        self, call: CallHeaders, session: ReplicaSession, handler: SessionHandler
    ) -> None:
        """Run an opened session with `handler` instead of the function's (a pod's terminal),
        until it ends or its caller cancels it."""
        key = (call.router, call.call_id)
        with self.cancellable(key), in_call(f"{call.router}-{call.call_id}", call.request_id):
            try:
                await self._serve_session(call, session, handler)
            except asyncio.CancelledError:
                if not self.cancelled_by_caller(key):
                    raise
                _log.info("session %s cancelled: its caller left", call.call_id)

    async def _session(self, call: CallHeaders, body: bytes) -> None:
        await self._serve_session(call, self.open_session(call, body))

    async def _serve_session(
        self, call: CallHeaders, session: ReplicaSession, handler: SessionHandler | None = None
    ) -> None:
        """Run a WebSocket handler (the function's, or `handler`) for as long as the session
        lasts (at most the call's timeout: the router's maximum session length); close it
        when the handler returns."""
        key = (call.router, call.call_id)
        code, reason = 1000, ""
        deadline = asyncio.timeout(call.timeout_s)
        try:
            async with deadline:
                if handler is not None:
                    await handler(session)
                else:
                    assert self.target is not None
                    await self.target.session(call.method, session)
        except SessionClosed:
            pass  # the client left and the handler let it show
        except TimeoutError as exc:
            if deadline.expired():
                code, reason = 1001, "the maximum session length was reached"
            else:
                code, reason = 1011, _user_error_reason(call, exc)
        except Exception as exc:  # noqa: BLE001 - the customer's code may raise anything
            code, reason = 1011, _user_error_reason(call, exc)
        finally:
            self._credits.pop(key, None)
            self._sessions.pop(key, None)
        try:
            await session.close(code, reason.encode()[:120].decode(errors="ignore"))
        except Exception as exc:  # noqa: BLE001 - NATS gone: the router notices our silence
            _log.warning("could not close session %s: %s", call.call_id, exc)

    # Answers -----------------------------------------------------------------------------------

    async def _reply_user_error(self, call: CallHeaders, exc: Exception) -> None:
        """The customer's exception: type and message to the caller, traceback to the logs."""
        await self.reply_error(call, FunctionError(_user_error_reason(call, exc)))

    def reply_subject(self, call: CallHeaders) -> str:
        return self.subjects.reply(call.router, self.function_id, call.call_id, call.token)

    async def reply_error(self, call: CallHeaders, error: KilnError) -> None:
        reply = {"code": error.code, "message": error.message, "status": error.status}
        if isinstance(error.fields.get("param"), str):  # the request field at fault
            reply["param"] = error.fields["param"]
        body = json.dumps(reply)
        await self.nc.publish(
            self.reply_subject(call),
            body.encode(),
            headers={H.EVENT: Event.ERROR, H.REPLICA: self._replica_str},
        )

    # What routers say about calls in progress --------------------------------------------------

    async def _on_control(self, msg: Msg) -> None:
        try:
            control = decode(StreamControl, msg.data)
        except (ValueError, TypeError):
            _log.warning("ignoring an unreadable stream control message")
            return
        key = (control.router, control.call)
        if control.cancel:
            task = self._running.get(key)
            if task is not None and not task.done():
                self._cancelled.add(key)
                task.cancel()
            return
        credits = self._credits.get(key)
        if credits is not None:
            credits.grant(control.limit)

    async def _on_session_frame(self, msg: Msg) -> None:
        *_, router, call_id = msg.subject.split(".")
        session = self._sessions.get((router, call_id))
        event = msg.headers.get(H.EVENT) if msg.headers else None
        if session is None or event is None:
            return
        try:
            kind, seq = parse_event(event)
        except ValueError:
            return
        session.on_frame(kind, seq, msg.data)


def _user_error_reason(call: CallHeaders, exc: BaseException) -> str:
    _log.error(
        "call %s (request %s) raised:\n%s",
        call.call_id,
        call.request_id,
        "".join(traceback.format_exception(exc)),
    )
    return f"{type(exc).__name__}: {exc}"

"""A replica: one process bound to one function version.

Life: connect to NATS and start heartbeating (state `starting`), fetch and unpack the code
artifact, import the app, build the instance — restored from its snapshot or by running the
`@enter(snap=True)` hooks (see `coldstart`) — and run the plain `@enter` hooks (`ready`), report
the cold start's phases, then pull calls — only as many as
it has free slots — and reply to each caller's inbox. On a drain order or SIGTERM it fetches
nothing new, finishes what it holds, runs `@exit` and exits.

A sync call that overruns its timeout cannot be stopped inside its thread; the caller gets its
504 at once and the replica drains and exits, so the scheduler replaces it.

Run as `python -m kiln.invoker.replica LAUNCH.json`; it holds no database or Stripe
credentials and talks to the platform only over NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, NoReturn

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from kiln import _loop
from kiln.codestore import CodeStore
from kiln.db.enums import ReplicaState
from kiln.errors import (
    FunctionError,
    FunctionTimeout,
    InvalidArguments,
    KilnError,
    ResultTooLarge,
)
from kiln.functions.loader import load_app, resolve
from kiln.functions.package import unpack
from kiln.functions.spec import CallKind, FunctionSpec
from kiln.invoker.coldstart import ColdStart, SnapshotLink, build_instance
from kiln.invoker.feed import CallFeed
from kiln.invoker.streams import StreamCredits, send_stream
from kiln.invoker.target import Target, build_target
from kiln.payloads import MAX_RESULT_BYTES, PayloadStore
from kiln.settings import Settings
from kiln.wire import (
    HEARTBEAT_INTERVAL_S,
    CallHeaders,
    ColdStartReport,
    Event,
    H,
    ReplicaHeartbeat,
    StartReplica,
    StreamControl,
    Subjects,
    consumer_name,
    decode,
    encode,
)

__all__ = ["Replica", "main"]

_log = logging.getLogger("kiln.replica")
# How often the replica re-checks its pull requests (most top-ups happen as calls finish).
_TOP_UP_EVERY_S = 1.0
_HEADER_ROOM = 8 * 1024
_JSON = "application/json"
_RESULT_JSON: dict[str, str] = {H.EVENT: Event.RESULT}


class Replica:
    def __init__(self, settings: Settings, launch: StartReplica, node_id: str) -> None:
        self.settings = settings
        self.launch = launch
        self.node_id = node_id
        self.replica_id = uuid.UUID(launch.replica_id)
        self.function_id = uuid.UUID(launch.function_id)
        self.spec = FunctionSpec.from_dict(launch.spec)
        self.subjects = Subjects(settings.namespace)
        self.state = ReplicaState.STARTING
        self.error: str | None = None
        self.in_flight: set[asyncio.Task[None]] = set()
        self.idle_since: float | None = time.time()
        self.draining = asyncio.Event()
        self.target: Target | None = None
        self.nc: NATS | None = None
        self.feed: CallFeed | None = None
        self._busy = 0  # calls taken and not finished (in_flight, counted before its tasks run)
        self._accepts: dict[str, list[str]] = {}  # router id -> call ids taken, not yet told
        # Calls running, by (router, call id): what a router's StreamControl refers to.
        self._running: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._credits: dict[tuple[str, str], StreamCredits] = {}
        self._cancelled: dict[tuple[str, str], bool] = {}
        self._payload_store: PayloadStore | None = None
        self._replica_str = str(self.replica_id)
        self._tasks: set[asyncio.Future[None]] = set()
        self.cold_start = ColdStart(on_phase=self._on_phase)
        self._first_call = True

    @property
    def concurrency(self) -> int:
        return self.spec.resources.concurrency

    async def run(self) -> int:
        self.nc = await nats.connect(
            servers=self.settings.nats_servers,
            connect_timeout=self.settings.connect_timeout_s,
            name=f"kiln-replica-{self.replica_id.hex[:8]}",
        )
        js = self.nc.jetstream()
        heartbeat = asyncio.create_task(self._heartbeat(), name="kiln-replica-heartbeat")
        drain_sub = await self.nc.subscribe(self.subjects.drain(self.replica_id), cb=self._on_drain)
        await self.nc.subscribe(self.subjects.replica_control(self.replica_id), cb=self._on_control)
        code = 0
        try:
            record = self.cold_start
            if self.launch.received_at:  # from the agent's order to this process running
                record.phases["assign"] = max(0.0, time.time() - self.launch.received_at)
            with record.phase("code_load"):
                self.target = await self._load(js)
            await build_instance(
                self.target,
                self._snapshot_link(),
                record,
                private=self.spec.resources.snapshot == "private",
            )
            self.state = ReplicaState.READY
            self.idle_since = time.time()
            await self._beat()
            _log.info("cold start: %s", record.summary())
            self._report(record.phases)
            await self._serve()
        except Exception as exc:  # noqa: BLE001 - any failure to start is reported, then exit 1
            code = 1
            self.state = ReplicaState.FAILED
            self.error = f"{type(exc).__name__}: {exc}"
            _log.error("replica failed: %s", "".join(traceback.format_exception(exc)))
        finally:
            await self._finish(heartbeat, drain_sub)
        return code

    def _snapshot_link(self) -> SnapshotLink | None:
        if self.launch.snapshot_key is None or self.spec.resources.snapshot == "off":
            return None
        assert self.nc is not None
        subject = self.subjects.snapshot_requests(self.node_id)
        return SnapshotLink(self.nc, subject, self.launch.replica_id)

    def _report(self, phases: dict[str, float]) -> None:
        """Tell the platform how the cold start went (its metrics and `kiln ps`)."""
        if self.nc is None:
            return
        report = ColdStartReport(
            replica_id=self._replica_str,
            function_id=str(self.function_id),
            origin=self.cold_start.origin.value,
            phases=phases,
            snapshot_bytes=self.cold_start.snapshot_bytes,
            fallback_reason=self.cold_start.fallback_reason,
        )
        self._spawn(self.nc.publish(self.subjects.cold_starts, encode(report)))

    async def _load(self, js: JetStreamContext) -> Target:
        code_dir = self.settings.home / "code" / self.launch.artifact_digest
        if not (code_dir / ".complete").exists():
            archive = await CodeStore(js, self.subjects).get(self.launch.artifact_digest)
            staging = code_dir.with_name(f"{code_dir.name}.{self.replica_id.hex}")
            await asyncio.to_thread(unpack, archive, staging)
            (staging / ".complete").touch()
            with contextlib.suppress(OSError):  # another replica may have won the race
                staging.rename(code_dir)
        # Importing user code can take seconds (torch, a model's library); off the event loop,
        # so heartbeats keep flowing and the replica is not taken for dead while it starts.
        app = await asyncio.to_thread(load_app, code_dir / self.launch.entrypoint)
        return build_target(self.spec, resolve(app, self.launch.function))

    async def _serve(self) -> None:
        assert self.nc is not None
        self.feed = CallFeed(
            self.nc,
            self.subjects.calls_stream,
            consumer_name(self.function_id),
            free_slots=lambda: self.concurrency - self._busy,
            on_call=self._start_call,
            # Large replicas ask in batches rather than one message per freed slot.
            threshold=max(1, self.concurrency // 4),
        )
        await self.feed.start()
        try:
            while not self.draining.is_set():
                try:
                    await self.feed.top_up()
                except Exception as exc:  # noqa: BLE001 - a NATS hiccup; the next tick retries
                    _log.warning("asking for calls failed (%s); retrying", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.draining.wait(), _TOP_UP_EVERY_S)
        finally:
            self.feed.close_intake()
        if self.in_flight:
            await asyncio.wait(set(self.in_flight), timeout=self.spec.resources.timeout_s + 5)
        with contextlib.suppress(Exception):
            await self.feed.close()

    def _start_call(self, msg: Msg) -> None:
        self.idle_since = None
        self._busy += 1
        task = asyncio.create_task(self._handle(msg))
        self.in_flight.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self.in_flight.discard(finished)
            if not self.in_flight:
                self.idle_since = time.time()

        task.add_done_callback(done)

    async def _handle(self, msg: Msg) -> None:
        try:
            try:
                call = CallHeaders.from_headers(msg.headers or {})
            except (KeyError, ValueError) as exc:
                _log.error("dropping a call with unreadable headers: %s", exc)
                await msg.ack()  # no replica could read it: redelivering it helps nobody
                return
            if call.generation > self.launch.generation:
                # A deploy or rollback made other code current: hand the call back for a
                # replica of that generation, and step aside.
                await msg.nak()
                self.request_drain()
                return
            # Taken: from here a crash surfaces to the caller as worker_lost (through our
            # missing heartbeats), never as a silent second run.
            await msg.ack()
            if time.time() > call.accept_by:
                return  # the caller gave up before we got to it
            self._accept(call)
            key = (call.router, call.call_id)
            task = asyncio.current_task()
            assert task is not None
            self._running[key] = task
            try:
                body = msg.data
                if call.payload is not None:
                    try:
                        body = await self._payloads().take(call.payload)
                    except Exception as exc:  # noqa: BLE001 - expired, or NATS trouble
                        _log.error("call %s: its stored body is gone: %s", call.call_id, exc)
                        await self._reply_error(
                            call, InvalidArguments("the call's stored body could not be read")
                        )
                        return
                await self._execute(call, body)
            except asyncio.CancelledError:
                if not self._cancelled.pop(key, False):
                    raise  # not the caller's cancel: the replica is stopping
                _log.info("call %s cancelled: its caller left", call.call_id)
            finally:
                self._running.pop(key, None)
        finally:
            self._busy -= 1
            if self.feed is not None:
                with contextlib.suppress(Exception):
                    await self.feed.top_up()

    def _accept(self, call: CallHeaders) -> None:
        """Tell the call's router we took it, batched with the other calls taken in this turn
        of the event loop: one message instead of one per call."""
        batch = self._accepts.setdefault(call.router, [])
        batch.append(call.call_id)
        if len(batch) == 1:
            asyncio.get_running_loop().call_soon(self._flush_accepts, call.router)

    def _flush_accepts(self, router: str) -> None:
        calls = self._accepts.pop(router, [])
        if calls and self.nc is not None:
            body = json.dumps({"replica": str(self.replica_id), "calls": calls}).encode()
            self._spawn(self.nc.publish(self.subjects.accepted(router), body))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, call: CallHeaders, body: bytes) -> None:
        assert self.nc is not None
        assert self.target is not None
        if self._first_call:
            self._first_call = False
            started = time.perf_counter()
            try:
                await self._execute(call, body)
            finally:
                self._report({"first_call": time.perf_counter() - started})
            return
        entry = self.spec.entry(call.method)
        if entry is not None and entry.kind is CallKind.GENERATOR and call.window > 0:
            await self._execute_stream(call, body)
            return
        deadline = asyncio.timeout(call.timeout_s)
        try:
            async with deadline:
                result = await self.target.call(call.method, body, call.content_type)
        except TimeoutError as exc:
            if not deadline.expired():  # the user's own TimeoutError
                await self._reply_user_error(call, exc)
                return
            await self._reply_error(call, FunctionTimeout(
                f"the call did not finish within the function's timeout ({call.timeout_s:g} s)"
            ))  # fmt: skip
            entry = self.spec.entry(call.method)
            if entry is None or not entry.is_async:
                self._poison("a sync call overran its timeout; its thread cannot be stopped")
            return
        except KilnError as exc:
            await self._reply_error(call, exc)
            return
        except Exception as exc:  # noqa: BLE001 - the customer's code may raise anything
            await self._reply_user_error(call, exc)
            return
        if len(result.body) > MAX_RESULT_BYTES:
            await self._reply_error(call, ResultTooLarge(
                f"the result has {len(result.body)} bytes; results are limited to "
                f"{MAX_RESULT_BYTES} bytes"
            ))  # fmt: skip
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
                headers = {**headers, H.PAYLOAD: await self._payloads().put(body)}
                body = b""
            await self.nc.publish(
                self.subjects.reply(call.router, call.call_id), body, headers=headers
            )
        except Exception as exc:  # noqa: BLE001 - tell the caller rather than leave it waiting
            _log.error("could not send the result of call %s: %s", call.call_id, exc)
            await self._reply_error(call, FunctionError(f"the result could not be sent: {exc}"))

    async def _execute_stream(self, call: CallHeaders, body: bytes) -> None:
        """Run a generator and stream what it yields; its timeout covers the whole stream."""
        assert self.nc is not None
        assert self.target is not None
        key = (call.router, call.call_id)
        credits = self._credits[key] = StreamCredits(call.window)
        deadline = asyncio.timeout(call.timeout_s)
        try:
            async with deadline:
                await send_stream(
                    self.nc,
                    self.subjects.reply(call.router, call.call_id),
                    self.target.stream(call.method, body, call.content_type),
                    credits,
                    payloads=self._payloads(),
                    inline_bytes=int(self.nc.max_payload) - _HEADER_ROOM,
                )
        except TimeoutError as exc:
            if not deadline.expired():
                await self._reply_user_error(call, exc)
                return
            await self._reply_error(call, FunctionTimeout(
                f"the stream did not finish within the function's timeout ({call.timeout_s:g} s)"
            ))  # fmt: skip
        except KilnError as exc:
            await self._reply_error(call, exc)
        except Exception as exc:  # noqa: BLE001 - the customer's code may raise anything
            await self._reply_user_error(call, exc)
        finally:
            self._credits.pop(key, None)

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
                self._cancelled[key] = True
                task.cancel()
            return
        credits = self._credits.get(key)
        if credits is not None:
            credits.grant(control.limit)

    async def _reply_user_error(self, call: CallHeaders, exc: Exception) -> None:
        """The customer's exception: type and message to the caller, traceback to the logs."""
        _log.error(
            "call %s (request %s) raised:\n%s",
            call.call_id,
            call.request_id,
            "".join(traceback.format_exception(exc)),
        )
        await self._reply_error(call, FunctionError(f"{type(exc).__name__}: {exc}"))

    async def _reply_error(self, call: CallHeaders, error: KilnError) -> None:
        assert self.nc is not None
        body = json.dumps({"code": error.code, "message": error.message, "status": error.status})
        await self.nc.publish(
            self.subjects.reply(call.router, call.call_id),
            body.encode(),
            headers={H.EVENT: Event.ERROR, H.REPLICA: self._replica_str},
        )

    def _payloads(self) -> PayloadStore:
        if self._payload_store is None:
            assert self.nc is not None
            self._payload_store = PayloadStore(self.nc.jetstream(), self.subjects)
        return self._payload_store

    def _poison(self, why: str) -> None:
        _log.error("replica will be replaced: %s", why)
        self.error = why
        self.request_drain()

    def _on_phase(self, name: str) -> None:
        """`kiln ps` shows a replica putting its snapshot back as restoring."""
        if self.state in (ReplicaState.STARTING, ReplicaState.RESTORING):
            restoring = name == "restore"
            self.state = ReplicaState.RESTORING if restoring else ReplicaState.STARTING
            if restoring and self.nc is not None:
                beat = asyncio.ensure_future(self._beat())
                self._tasks.add(beat)
                beat.add_done_callback(self._tasks.discard)

    async def _on_drain(self, msg: Msg) -> None:
        self.request_drain()

    def request_drain(self) -> None:
        """Stop taking calls; say so at once, so the scheduler stops counting on us."""
        if self.draining.is_set():
            return
        self.draining.set()
        if self.state in (ReplicaState.STARTING, ReplicaState.RESTORING, ReplicaState.READY):
            self.state = ReplicaState.DRAINING
            if self.nc is not None:
                beat = asyncio.ensure_future(self._beat())
                self._tasks.add(beat)
                beat.add_done_callback(self._tasks.discard)

    async def _finish(self, heartbeat: asyncio.Task[None], drain_sub: Any) -> None:
        if self.state is not ReplicaState.FAILED:
            self.state = ReplicaState.DRAINING
        if self.target is not None:
            try:
                await asyncio.wait_for(self.target.exit(), 30)
            except TimeoutError:
                _log.error("@exit hooks did not finish within 30 s; exiting without them")
            except Exception as exc:  # noqa: BLE001 - the user's @exit failing must not hang us
                _log.error("@exit hook failed: %s: %s", type(exc).__name__, exc)
        if self.state is not ReplicaState.FAILED:
            self.state = ReplicaState.STOPPED
        if self.cold_start.sealing is not None:  # the agent may still be sealing our bake
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.cold_start.sealing), 30)
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
        with contextlib.suppress(Exception):
            await self._beat()
            await drain_sub.unsubscribe()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()

    async def _heartbeat(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self._beat()
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _beat(self) -> None:
        assert self.nc is not None
        beat = ReplicaHeartbeat(
            replica_id=str(self.replica_id),
            function_id=str(self.function_id),
            version_id=self.launch.version_id,
            node_id=self.node_id,
            state=self.state.value,
            in_flight=len(self.in_flight),
            idle_since=self.idle_since,
            error=self.error,
        )
        await self.nc.publish(self.subjects.replica_heartbeat(self.replica_id), encode(beat))


def main() -> None:
    serve_launch(Path(sys.argv[1]))


def serve_launch(launch_path: Path) -> NoReturn:
    """Be the replica that `launch_path` describes, until it stops; then exit the process.
    A fresh process (`main`) and an assigned standby (`kiln.invoker.standby`) both end here."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    data = json.loads(launch_path.read_text())
    node_id = data.pop("node_id")
    settings = Settings.from_env(os.environ)
    replica = Replica(settings, StartReplica(**data), node_id)

    async def serve() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, replica.request_drain)
        return await replica.run()

    code = _loop.run(serve())
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: interpreter shutdown would wait for a user thread still stuck in an
    # overrun sync call, keeping a replica that already said goodbye alive.
    os._exit(code)


if __name__ == "__main__":
    main()

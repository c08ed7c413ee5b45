"""A replica: one process bound to one function version.

Life: connect to NATS and start heartbeating (state `starting`), import the app from the code
its node agent unpacked, build the instance — restored from its snapshot or by running the
`@enter(snap=True)` hooks (see `coldstart`) — and run the plain `@enter` hooks (`ready`), report
the cold start's phases, then pull calls — only as many as it has free slots — and run them
(`kiln.invoker.calls`: plain calls, streams and WebSocket sessions). On a drain order or
SIGTERM it fetches nothing new, finishes what it holds, runs `@exit` and exits.

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

from nats.aio.client import Client as NATS
from nats.aio.client import RawCredentials
from nats.aio.msg import Msg

from kiln import _loop
from kiln._nats import NatsLink
from kiln._tasks import cancel_and_wait
from kiln.db.enums import ReplicaState
from kiln.errors import InternalError
from kiln.functions.loader import load_app, resolve
from kiln.functions.spec import FunctionSpec
from kiln.invoker.calls import CallRunner
from kiln.invoker.coldstart import ColdStart, SnapshotLink, build_instance, classify_process
from kiln.invoker.containers import CONTAINER_START_S, GATEWAY_SOCKET
from kiln.invoker.credentials import replica_inbox
from kiln.invoker.environments import wait_for_environment
from kiln.invoker.feed import CallFeed
from kiln.invoker.jobs import JobRunner
from kiln.invoker.output import CallContextFilter, FunctionOutput
from kiln.invoker.pod_host import PodHost
from kiln.invoker.target import Target, build_target
from kiln.pods.container_exec import wait_for_container
from kiln.seal import FunctionSealer
from kiln.settings import Settings
from kiln.wire import (
    HEARTBEAT_INTERVAL_S,
    JOB_ROUTER,
    CallHeaders,
    ColdStartReport,
    H,
    ReplicaHeartbeat,
    StartReplica,
    Subjects,
    consumer_name,
    encode,
)

__all__ = ["Replica", "main"]

_log = logging.getLogger("kiln.replica")
_UNSEALED = (
    "the call does not carry its function's seal: the router and the node agent must share "
    "KILN_SNAPSHOT_SIGNING_KEY"
)
# How often the replica re-checks its pull requests (most top-ups happen as calls finish).
_TOP_UP_EVERY_S = 1.0
# How long an exiting replica waits for the messages it still has on their way (the cold-start
# report is written off the path to the first call, and a replica with a short idle timeout can
# be told to drain before it is out).
_LAST_REPORTS_S = 10.0


class Replica:
    def __init__(
        self,
        settings: Settings,
        launch: StartReplica,
        node_id: str,
        *,
        preloaded: frozenset[str] = frozenset(),
        from_standby: bool = False,
        nats_creds: str | None = None,
        function_key: bytes | None = None,
    ) -> None:
        """`preloaded`: the modules this process had imported when it was given `launch`;
        `from_standby`: it was a standby process (not started for this replica);
        `nats_creds`: the credentials its node agent issued it, if NATS requires them;
        `function_key`: what it seals its messages with (kiln.seal), from its node agent."""
        self.settings = settings
        self.nats_creds = nats_creds
        self.sealer = FunctionSealer(function_key)
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
        self.output: FunctionOutput | None = None
        self._busy = 0  # calls taken and not finished (in_flight, counted before its tasks run)
        # router id -> (call id, token) of the calls taken, not yet told
        self._accepts: dict[str, list[tuple[str, str]]] = {}
        self._accepts_written: dict[str, asyncio.Future[None]] = {}
        self.calls: CallRunner | None = None
        self.pod_host: PodHost | None = None  # a pod's or a shell's replica
        self.calls_taken = 0  # in its heartbeats (its node agent shows them in usage)
        self.jobs: JobRunner | None = None
        self._replica_str = str(self.replica_id)
        self._tasks: set[asyncio.Future[None]] = set()
        self.cold_start = ColdStart(on_phase=self._on_phase, preloaded=preloaded)
        self.from_standby = from_standby
        self._first_call = True
        # When it became ready: routers count a call published before then as a cold one.
        self.ready_at = 0.0

    @property
    def concurrency(self) -> int:
        return self.spec.resources.concurrency

    async def run(self) -> int:
        # Like every process, it reconnects forever; calls in progress go on meanwhile, and
        # what they send waits in the client's buffer.
        link = NatsLink(f"kiln-replica-{self.replica_id.hex[:8]}")
        link.on_reconnected(self._ask_again)
        self.nc = await link.connect(
            self.settings,
            inbox_prefix=replica_inbox(self.replica_id),
            user_credentials=RawCredentials(self.nats_creds) if self.nats_creds else None,
        )
        self.output = FunctionOutput(
            self.nc, self.subjects.logs(self.function_id), self._replica_str, sealer=self.sealer
        )
        self.output.install()
        shipping = asyncio.create_task(self.output.run(), name="kiln-replica-output")
        heartbeat = asyncio.create_task(self._heartbeat(), name="kiln-replica-heartbeat")
        drain_sub = await self.nc.subscribe(self.subjects.drain(self.replica_id), cb=self._on_drain)
        code = 0
        try:
            if self.launch.pod_id is not None:
                await self._host_pod()
                return code
            record = self.cold_start
            if self.launch.received_at:  # from the agent's order to this process running
                record.phases["assign"] = max(0.0, time.time() - self.launch.received_at)
            with record.phase("code_load"):
                self.target = await self._load()
            await build_instance(
                self.target,
                self._snapshot_link(),
                record,
                private=self.spec.resources.snapshot == "private",
            )
            self.calls = CallRunner(
                self.nc, self.subjects, self.spec, self.replica_id, self.target,
                function_id=self.function_id, on_poison=self._poison,
            )  # fmt: skip
            await self.calls.start()
            self.ready_at = time.time()
            self.jobs = JobRunner(
                self.nc, self.subjects, self.calls, sealer=self.sealer, ready_at=self.ready_at
            )
            self.state = ReplicaState.READY
            self.idle_since = self.ready_at
            await self._beat()
            self._spawn(self._report_ready(frozenset(sys.modules)))
            await self._serve()
        except Exception as exc:  # noqa: BLE001 - any failure to start is reported, then exit 1
            code = 1
            self.state = ReplicaState.FAILED
            self.error = f"{type(exc).__name__}: {exc}"
            _log.error("replica failed: %s", "".join(traceback.format_exception(exc)))
        finally:
            await self._finish(heartbeat, drain_sub, shipping)
        return code

    async def _host_pod(self) -> None:
        """A pod's or a shell's replica: terminals in this sandbox, no instance, no queue."""
        assert self.nc is not None
        if self.launch.environment:  # its requirements, which its node installs meanwhile
            await wait_for_environment(Path(self.launch.environment))
        if self.launch.image:  # its container, which its node pulls and runs meanwhile
            await wait_for_container(Path.cwd() / GATEWAY_SOCKET, within_s=CONTAINER_START_S)
        self.calls = CallRunner(
            self.nc, self.subjects, self.spec, self.replica_id, None,
            function_id=self.function_id, on_poison=self._poison,
        )  # fmt: skip
        await self.calls.start()
        code_dir = self.settings.home / "code" / self.launch.artifact_digest
        host = self.pod_host = PodHost(
            self.nc, self.subjects, self.launch, self.calls, sealer=self.sealer,
            code_dir=code_dir, accept=self._accept, track=self._track, drain=self.request_drain,
        )  # fmt: skip
        await host.start()
        self.ready_at = time.time()
        self.state = ReplicaState.READY
        self.idle_since = self.ready_at
        await self._beat()
        await host.serve(self.draining)
        if self.in_flight:  # a pod stopped with its terminals open: they are hung up
            for task in list(self.in_flight):
                task.cancel()
            await asyncio.wait(set(self.in_flight), timeout=10)

    def _snapshot_link(self) -> SnapshotLink | None:
        if self.launch.snapshot_key is None or self.spec.resources.snapshot == "off":
            return None
        assert self.nc is not None
        subject = self.subjects.snapshot_requests(self.node_id, self.replica_id)
        return SnapshotLink(self.nc, subject, self.launch.replica_id, sealer=self.sealer)

    async def _report_ready(self, loaded: frozenset[str]) -> None:
        """Log and report the cold start, off the path to the first call: what the process had
        imported by the time it was ready (`loaded`) says which process it started in."""
        record = self.cold_start
        await asyncio.to_thread(classify_process, record, self.from_standby, loaded)
        _log.info("cold start: %s", record.summary())
        self._report(record.phases)

    def _report(self, phases: dict[str, float]) -> None:
        """Tell the platform how the cold start went (its metrics and `kiln ps`; the node
        agent learns from it what standbys for this function should import, and refills the
        standby this replica took once the first call is done)."""
        if self.nc is None:
            return
        report = ColdStartReport(
            replica_id=self._replica_str,
            function_id=str(self.function_id),
            origin=self.cold_start.origin.value,
            phases=phases,
            snapshot_bytes=self.cold_start.snapshot_bytes,
            fallback_reason=self.cold_start.fallback_reason,
            process=self.cold_start.process.value,
            late_imports=list(self.cold_start.late_imports),
        )
        self._spawn(self._publish(self.subjects.cold_start(self.replica_id), encode(report)))

    async def _load(self) -> Target:
        # The node agent unpacked the code before starting us (a replica cannot read the
        # code store): in the box, or in the node's code cache, where KILN_HOME points.
        code_dir = self.settings.home / "code" / self.launch.artifact_digest
        self.cold_start.code_root = code_dir
        if not (code_dir / ".complete").exists():
            raise InternalError(f"the function's code is not at {code_dir}")
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

    async def _ask_again(self) -> None:
        """Back from a lost connection: ask for calls now, not when the forgotten pull
        requests would have expired."""
        if self.feed is not None:
            self.feed.forget_requests()
            with contextlib.suppress(Exception):
                await self.feed.top_up()

    def _start_call(self, msg: Msg) -> None:
        self._busy += 1
        self._track(asyncio.create_task(self._handle(msg)))

    def _track(self, task: asyncio.Task[None]) -> None:
        """`task` runs a call: the replica is busy until it ends."""
        self.idle_since = None
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
            headers = msg.headers or {}
            if not self.sealer.opens(msg.subject, headers[H.CALL].encode(), headers):
                # No router of this installation sent it (kiln.seal): one with another signing
                # key, or a forgery. Ended, so that it does not come back (and keep the function
                # scaled up) until it expires; a caller waiting for it is told why.
                _log.warning("dropping call %s: it does not carry this function's seal",
                             call.call_id)  # fmt: skip
                with contextlib.suppress(Exception):
                    await msg.term()
                if call.router != JOB_ROUTER and self.calls is not None:
                    with contextlib.suppress(Exception):
                        await self.calls.reply_error(call, InternalError(_UNSEALED))
                return
            if call.generation > self.launch.generation:
                # A deploy or rollback made other code current: hand the call back for a
                # replica of that generation, and step aside.
                await msg.nak()
                self.request_drain()
                return
            if call.router == JOB_ROUTER:
                assert self.jobs is not None
                self._count_call()
                await self.jobs.run(msg, call)  # acked when done: a crash means a retry
                return
            # Taken: from here a crash surfaces to the caller as worker_lost (through our
            # missing heartbeats), never as a silent second run.
            await msg.ack()
            if time.time() > call.accept_by:
                return  # the caller gave up before we got to it
            self._count_call()
            await self._accept(call)
            await self._execute(call, msg.data)
        finally:
            self._busy -= 1
            if self.feed is not None:
                with contextlib.suppress(Exception):
                    await self.feed.top_up()

    def _count_call(self) -> None:
        self.calls_taken += 1

    def _accept(self, call: CallHeaders) -> asyncio.Future[None]:
        """Tell the call's router we took it, batched with the other calls taken in this turn
        of the event loop: one message instead of one per call. The future is done once the
        message (and the call's ack before it) is in the socket: from then on the router
        learns of this replica even if the call's code kills the process at once, and answers
        its caller with worker_lost instead of waiting for the call's startup deadline."""
        batch = self._accepts.setdefault(call.router, [])
        batch.append((call.call_id, call.token))
        written = self._accepts_written.get(call.router)
        if written is None:
            written = self._accepts_written[call.router] = asyncio.Future()
            asyncio.get_running_loop().call_soon(self._flush_accepts, call.router)
        return written

    def _flush_accepts(self, router: str) -> None:
        calls = self._accepts.pop(router, [])
        written = self._accepts_written.pop(router)
        self._spawn(self._send_accepts(router, calls, written))

    async def _send_accepts(
        self, router: str, calls: list[tuple[str, str]], written: asyncio.Future[None]
    ) -> None:
        try:
            if calls and self.nc is not None:
                body = json.dumps({
                    "replica": self._replica_str, "ready_at": self.ready_at,
                    "calls": [call_id for call_id, _ in calls],
                    "tokens": [token for _, token in calls],  # that it took them, not heard of
                }).encode()  # fmt: skip
                await self.nc.publish(self.subjects.accepted(router, self.function_id), body)
                # Into the socket now, not at the flusher's next turn (no round trip: the
                # kernel sends it even if this process dies next).
                await self.nc._flush_pending(force_flush=True)
        except Exception as exc:  # noqa: BLE001 - NATS trouble: the call runs all the same
            _log.warning("telling router %s of %d calls failed: %s", router, len(calls), exc)
        finally:
            if not written.done():
                written.set_result(None)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, call: CallHeaders, body: bytes) -> None:
        assert self.calls is not None
        if not self._first_call:
            await self.calls.run(call, body)
            return
        self._first_call = False
        started = time.perf_counter()
        try:
            await self.calls.run(call, body)
        finally:
            self._report({"first_call": time.perf_counter() - started})

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

    async def _finish(
        self,
        heartbeat: asyncio.Task[None],
        drain_sub: Any,
        shipping: asyncio.Task[None],
    ) -> None:
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
        await cancel_and_wait(heartbeat, shipping)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=_LAST_REPORTS_S)
        if self.output is not None:  # the last lines (the @exit hooks' too)
            self.output.uninstall()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self.output.send()
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
            calls=self.calls_taken,
            pod_id=self.launch.pod_id,
            active_at=self.pod_host.active_at if self.pod_host is not None else None,
        )
        await self._publish(self.subjects.replica_heartbeat(self.replica_id), encode(beat))

    async def _publish(self, subject: str, body: bytes) -> None:
        """A message for the platform, under its function's seal."""
        assert self.nc is not None
        await self.nc.publish(subject, body, headers=self.sealer.headers(subject, body))


def main() -> None:
    serve_launch(Path(sys.argv[1]), preloaded=frozenset(sys.modules))


def serve_launch(
    launch_path: Path, *, preloaded: frozenset[str], from_standby: bool = False
) -> NoReturn:
    """Be the replica that `launch_path` describes, until it stops; then exit the process.
    A fresh process (`main`) and an assigned standby (`kiln.invoker.standby`) both end here;
    `preloaded` is what the process had imported by then."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s [%(request_id)s] %(message)s"
    )
    for handler in logging.getLogger().handlers:  # the request id of the call being served
        handler.addFilter(CallContextFilter())
    data = json.loads(launch_path.read_text())
    node_id = data.pop("node_id")
    nats_creds = data.pop("nats_creds", None)
    function_key = data.pop("function_key", None)
    settings = Settings.from_env(os.environ)
    replica = Replica(
        settings, StartReplica(**data), node_id,
        preloaded=preloaded, from_standby=from_standby, nats_creds=nats_creds,
        function_key=bytes.fromhex(function_key) if function_key else None,
    )  # fmt: skip

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

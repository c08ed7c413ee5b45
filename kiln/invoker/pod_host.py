"""A pod's (or a shell's) replica: it takes no calls from its function's queue and builds no
instance of the function; it serves terminals (`kiln.pods.terminal_session`) and its forwarded
ports' connections (`kiln.pods.tunnel`) in its sandbox, with its function's code, environment,
secrets and GPUs.

A router opens either with a call message on `ns.replica.<rid>.open` (core NATS), sent again
until the replica says it took it (the `accepted` message every call gets), so a router may
open one while the replica still starts. From there it is a session like a WebSocket
handler's (`kiln.invoker.calls`). A shell's replica serves one terminal and then drains: the
shell ends with it; one nobody opened within `SHELL_ATTACH_S` drains too (its router died).

`active_at` is when a terminal or a forwarded connection last carried a frame either way (or
the replica started): an open terminal nobody types in is idle. The replica's heartbeats carry
it; the scheduler stops a pod idle past its `auto_stop_s`, the billing service mails a
reminder (kiln.billing.pod_reminders).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from kiln.db.enums import PodKind
from kiln.errors import Conflict
from kiln.functions.session import Session
from kiln.invoker.calls import CallRunner
from kiln.invoker.containers import GATEWAY_SOCKET
from kiln.invoker.sessions import ReplicaSession
from kiln.pods.terminal_session import TerminalRequest, login_env, serve_terminal
from kiln.pods.tunnel import serve_tunnel
from kiln.seal import FunctionSealer
from kiln.wire import TUNNEL_METHOD, CallHeaders, H, StartReplica, Subjects

__all__ = ["SHELL_ATTACH_S", "PodHost"]

_log = logging.getLogger("kiln.replica")
# A shell's replica nobody opened a terminal on within this long after it was ready drains.
SHELL_ATTACH_S = 120.0
# Calls (router, call id) remembered as taken: a router repeats its open until it hears so.
_REMEMBERED = 1024


class PodHost:
    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        launch: StartReplica,
        calls: CallRunner,
        *,
        sealer: FunctionSealer,
        code_dir: Path,
        accept: Callable[[CallHeaders], Awaitable[None]],
        track: Callable[[asyncio.Task[None]], None],
        drain: Callable[[], None],
    ) -> None:
        """`accept` tells a call's router the replica took it; `track` counts a session as
        in flight until its task ends; `drain` ends the replica."""
        self.nc = nc
        self.subjects = subjects
        self.launch = launch
        self.calls = calls
        self.sealer = sealer
        self.code_dir = code_dir
        self.accept = accept
        self.track = track
        self.drain = drain
        self.shell = launch.pod_kind == PodKind.SHELL
        # A container pod's: what its terminals run and its ports are is in its container,
        # reached through its node agent (kiln.invoker.containers).
        self.gateway = Path.cwd() / GATEWAY_SOCKET if launch.image else None
        self.replica_id = calls.replica_id
        self._taken: dict[tuple[str, str], None] = {}
        self._opened = asyncio.Event()
        self.active_at = time.time()  # epoch seconds: its last terminal or port traffic

    def _touch(self) -> None:
        self.active_at = time.time()

    async def start(self) -> None:
        await self.nc.subscribe(self.subjects.pod_sessions(self.replica_id), cb=self._on_open)

    async def serve(self, draining: asyncio.Event) -> None:
        """Until the replica is told to drain (or a shell's terminal ended)."""
        if self.shell:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._opened.wait(), SHELL_ATTACH_S)
            if not self._opened.is_set():
                _log.warning("no terminal was opened on this shell: it ends")
                self.drain()
        await draining.wait()

    async def _on_open(self, msg: Msg) -> None:
        headers = msg.headers or {}
        try:
            call = CallHeaders.from_headers(headers)
        except (KeyError, ValueError) as exc:
            _log.warning("ignoring a terminal with unreadable headers: %s", exc)
            return
        if not self.sealer.opens(msg.subject, headers[H.CALL].encode(), headers):
            _log.warning("ignoring terminal %s: it does not carry this function's seal",
                         call.call_id)  # fmt: skip
            return
        key = (call.router, call.call_id)
        if key in self._taken:
            await self.accept(call)  # its router did not hear it the first time
            return
        self._taken[key] = None
        while len(self._taken) > _REMEMBERED:
            del self._taken[next(iter(self._taken))]
        if call.method == TUNNEL_METHOD:
            session = self.calls.open_session(call, msg.data)
            self.track(asyncio.create_task(self._tunnel(call, session)))
            await self.accept(call)
            return
        if self.shell and self._opened.is_set():
            await self.calls.reply_error(call, Conflict(
                "this shell's terminal is already open: a shell has one terminal"
            ))  # fmt: skip
            return
        self._opened.set()
        session = self.calls.open_session(call, msg.data)  # before the router hears of it
        self.track(asyncio.create_task(self._run(call, session)))
        await self.accept(call)

    async def _run(self, call: CallHeaders, session: ReplicaSession) -> None:
        try:
            await self.calls.run_session(call, session, functools.partial(self._terminal, call))
        finally:
            if self.shell:
                self.drain()  # the shell ends with its terminal

    async def _tunnel(self, call: CallHeaders, session: ReplicaSession) -> None:
        async def connect(opened: Session) -> None:
            try:
                port = int(opened.params.get("port", ""))
            except ValueError:
                await opened.close(1011, "no port was given")
                return
            await serve_tunnel(_Watched(opened, self._touch), port, gateway=self.gateway)

        await self.calls.run_session(call, session, connect)

    async def _terminal(self, call: CallHeaders, session: Session) -> None:
        request = TerminalRequest(session.params)
        env = login_env(os.environ)
        watched = _Watched(session, self._touch)
        code = await serve_terminal(
            watched, request, env=env, cwd=self.code_dir, gateway=self.gateway
        )
        _log.info("terminal %s ended with status %d", call.call_id, code)


class _Watched(Session):
    """A session whose every frame, either way, counts as its pod's traffic."""

    def __init__(self, inner: Session, touch: Callable[[], None]) -> None:
        self._inner = inner
        self._touch = touch

    @property
    def params(self) -> Mapping[str, str]:
        return self._inner.params

    async def receive(self) -> str | bytes:
        message = await self._inner.receive()
        self._touch()
        return message

    async def send(self, message: str | bytes) -> None:
        await self._inner.send(message)
        self._touch()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self._inner.close(code, reason)

"""Standby processes: replicas-to-be that did the slow part of starting before any call needs
them, and the node agent's pool that keeps them ready.

A standby imports what `KILN_STANDBY_IMPORTS` lists (torch by default) and the replica runtime,
and, when it sees a GPU, creates its CUDA context and the pinned staging ring that snapshot
restores copy through. Then it says `ready` on stdout and waits for one line on stdin: its
assignment (launch file, working directory, environment, log file). From there it is an
ordinary replica (`replica.serve_launch`). A cold start that gets a standby skips the
interpreter start, `import torch` and CUDA initialisation: "assign, load code, restore, serve".

GPU standbys are bound to one device (`CUDA_VISIBLE_DEVICES` cannot change once CUDA is up), so
the pool keeps them per device; CPU standbys are interchangeable. The pool refills itself in the
background after every assignment.

Run as `python -m kiln.invoker.standby` (by the node agent only).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kiln._proc import die_with_parent

__all__ = ["Assignment", "Standby", "StandbyPool", "main"]

_log = logging.getLogger("kiln.agent")
READY = b"ready\n"
# Importing torch and creating a CUDA context take seconds, not minutes.
_READY_TIMEOUT_S = 300.0
_RETRY_AFTER_S = 30.0
# A replacement starts after the cold start that took a standby has had the CPU to itself:
# importing torch beside a restore and a first call slows both down on a small node.
REFILL_DELAY_S = 3.0


@dataclass(frozen=True)
class Assignment:
    launch_file: str
    cwd: str
    env: dict[str, str]
    log_file: str


@dataclass(eq=False)
class Standby:
    device: str  # CUDA_VISIBLE_DEVICES: "" for CPU, else one GPU index
    process: asyncio.subprocess.Process

    async def assign(self, assignment: Assignment) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(json.dumps(assignment.__dict__).encode() + b"\n")
        await stdin.drain()
        stdin.close()


@dataclass
class StandbyPool:
    """Per device key ("" for CPU slots, "3" for GPU 3): how many to keep and those ready."""

    size: int
    env_for: Callable[[str], dict[str, str]]  # the base environment of a standby on a device
    log_file: Path
    wanted: dict[str, int] = field(default_factory=dict)
    ready: dict[str, list[Standby]] = field(default_factory=dict)
    _starting: dict[str, int] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _closed: bool = False

    def keep(self, device: str, count: int) -> None:
        """Keep `count` standbys ready on `device`; ready ones beyond it stop (a GPU that a
        replica took without one must not keep a second CUDA context alive)."""
        self.wanted[device] = count if self.size else 0
        ready = self.ready.get(device, [])
        while len(ready) > self.wanted[device]:
            with contextlib.suppress(ProcessLookupError):
                ready.pop().process.kill()  # reaped by its transport
        self._refill(device)

    def take(self, device: str) -> Standby | None:
        """A ready standby for `device`, or None; the pool starts a replacement."""
        ready = self.ready.get(device, [])
        while ready:
            standby = ready.pop()
            if standby.process.returncode is None:
                self._refill(device, delay_s=REFILL_DELAY_S)
                return standby
        return None

    def has_ready(self, device: str) -> bool:
        return self.ready_count(device) > 0

    def ready_count(self, device: str) -> int:
        return sum(s.process.returncode is None for s in self.ready.get(device, []))

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for standbys in self.ready.values():
            for standby in standbys:
                with contextlib.suppress(ProcessLookupError):
                    standby.process.kill()
                await standby.process.wait()
        self.ready.clear()

    def _refill(self, device: str, delay_s: float = 0.0) -> None:
        if self._closed:
            return
        have = len(self.ready.get(device, [])) + self._starting.get(device, 0)
        for _ in range(self.wanted.get(device, 0) - have):
            self._starting[device] = self._starting.get(device, 0) + 1
            task = asyncio.create_task(
                self._start(device, delay_s), name=f"kiln-standby-{device or 'cpu'}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _start(self, device: str, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        try:
            standby = await self._spawn(device)
        except Exception as exc:  # noqa: BLE001 - replicas start the slow way meanwhile
            _log.warning("a standby process failed to start (%s); retrying later", exc)
            self._starting[device] -= 1
            await asyncio.sleep(_RETRY_AFTER_S)
            self._refill(device)
            return
        self._starting[device] -= 1
        if self._closed or len(self.ready.get(device, [])) >= self.wanted.get(device, 0):
            standby.process.kill()  # no longer wanted (the GPU got a replica meanwhile)
            await standby.process.wait()
            return
        self.ready.setdefault(device, []).append(standby)

    async def _spawn(self, device: str) -> Standby:
        log = open(self.log_file, "ab")  # noqa: SIM115, ASYNC230 - a local file opens at once
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "kiln.invoker.standby",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=self.env_for(device),
                start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGTERM, os.getpid()),
            )
        finally:
            log.close()
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), _READY_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if line != READY:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise RuntimeError(f"it exited with status {process.returncode} before it was ready")
        return Standby(device, process)


# The standby process ------------------------------------------------------------------------------


def _prepare() -> None:
    from kiln.settings import Settings

    settings = Settings.from_env(os.environ)
    for name in settings.standby_imports:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            print(f"standby: cannot import {name}: {exc}", file=sys.stderr, flush=True)
    importlib.import_module("kiln.invoker.replica")
    if "torch" in sys.modules:
        importlib.import_module("kiln.snapshots.restore")
        torch = sys.modules["torch"]
        if os.environ.get("CUDA_VISIBLE_DEVICES") and torch.cuda.is_available():
            from kiln.snapshots.cuda import prepare

            # CUDA context, cuBLAS handle, pinned staging ring and its reader threads: made
            # before any call waits for them.
            prepare()


def main() -> None:
    _prepare()
    sys.stdout.buffer.write(READY)
    sys.stdout.buffer.flush()
    line = sys.stdin.readline()
    if not line:  # the agent went away without assigning us
        os._exit(0)
    assignment = Assignment(**json.loads(line))
    os.environ.clear()
    os.environ.update(assignment.env)
    os.chdir(assignment.cwd)
    log = os.open(assignment.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    os.close(stdin)

    from kiln.invoker.replica import serve_launch

    serve_launch(Path(assignment.launch_file))


if __name__ == "__main__":
    main()

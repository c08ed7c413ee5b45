"""The node agent's pool of standby processes (`kiln.invoker.standby`), kept ready by device and
flavour.

The agent says what to keep (`keep`): for each device key ("" for CPU slots, "3" for GPU 3)
how many standbys of which flavours (`kiln.invoker.flavours`). GPU standbys are bound to one
device (`CUDA_VISIBLE_DEVICES` cannot change once CUDA is up); CPU standbys are interchangeable.

A cold start `take`s the standby that covers its function's need with the fewest imports;
failing that, a generic one (the base flavour); failing that, none (a fresh process, the slow
way). On a GPU, whose standby goes with the device anyway, any standby under the same env comes
before none; on CPU slots another flavour's standby stays for the functions it is kept for (a
function that keeps failing to start would otherwise use up every flavour's standbys). The
standby it took is replaced once the
agent `release`s the take, when that cold start's first call is done (or the replica exited, or
`HOLD_MAX_S` passed): importing a library beside a restore and a first call slows both on a
small node.

Memory bounds the pool: a standby is started only while the standbys' resident memory together
stays within the budget and the node keeps a reserve of free memory. Each flavour's size and
start time are measured on its first standbys.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from kiln._proc import can_raise_priority, die_with_parent, raise_priority
from kiln.invoker.flavours import BASE, Flavour
from kiln.invoker.sandbox import Box, Sandboxes, gpu_devices
from kiln.invoker.standby import READY, Assignment
from kiln.observability.standbys import StandbyMetrics

__all__ = ["HOLD_MAX_S", "Standby", "StandbyPool", "memory_info"]

_log = logging.getLogger("kiln.agent")
# Importing a model's library and creating a CUDA context take seconds, not minutes.
_READY_TIMEOUT_S = 300.0
_RETRY_AFTER_S = 30.0
# A take is refilled by then at the latest, first call or not (a replica that never gets one).
HOLD_MAX_S = 60.0
# A flavour whose standbys failed to start this many times in a row is not started again (its
# imports crash or hang the interpreter); its functions get generic standbys.
_MAX_FAILURES = 3
# Free memory the pool leaves to replicas, as a share of the node's memory.
_RESERVE_SHARE = 0.10
_DEFAULT_READY_S = 5.0
# A standby imports (and waits) at this nice value, so a refill importing torch yields the CPU to
# the cold start restoring beside it; assigned, it gets nice 0 back. Only where the node agent
# may give it back (root, as in production; not a user's `kiln dev`).
_WAITING_NICE = 10

Key = tuple[str, str]  # (device, flavour id)


def memory_info() -> tuple[int, int]:
    """(total, available) bytes of this node's memory, from /proc/meminfo; (0, 0) elsewhere."""
    found: dict[str, int] = {}
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            name, _, value = line.partition(":")
            if name in ("MemTotal", "MemAvailable"):
                found[name] = int(value.split()[0]) * 1024
    return found.get("MemTotal", 0), found.get("MemAvailable", 0)


def _resident(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(eq=False)
class Standby:
    device: str  # CUDA_VISIBLE_DEVICES: "" for CPU, else one GPU index
    flavour: Flavour
    process: asyncio.subprocess.Process
    rss: int = 0  # resident bytes when it said ready
    niced: bool = False  # started at _WAITING_NICE
    box: Box | None = None  # its sandbox; the replica it becomes keeps it
    assigned: bool = False

    async def assign(self, assignment: Assignment) -> None:
        stdin = self.process.stdin
        if stdin is None:
            raise RuntimeError("the standby has no stdin")
        if self.niced:
            for pid in self.box.pids() if self.box is not None else [self.process.pid]:
                raise_priority(pid)
        self.assigned = True
        stdin.write(json.dumps(assignment.__dict__).encode() + b"\n")
        await stdin.drain()
        stdin.close()


@dataclass
class StandbyPool:
    """Standbys by (device, flavour id): how many to keep, those ready, those starting."""

    env_for: Callable[[str, Flavour], dict[str, str]]  # a standby's environment
    directory: Path  # its working directory; flavour files and the standby log go here
    memory_budget: int  # bytes all standbys may hold together (0: no standbys start)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    clock: Callable[[], float] = time.monotonic
    sandboxes: Sandboxes | None = None  # standbys start in sandboxes of their own
    wanted: dict[Key, int] = field(default_factory=dict)
    ready: dict[Key, list[Standby]] = field(default_factory=dict)
    flavours: dict[str, Flavour] = field(default_factory=dict)
    _starting: dict[Key, int] = field(default_factory=dict)
    _holds: dict[str, tuple[Key, asyncio.TimerHandle | None]] = field(default_factory=dict)
    _rss: dict[str, int] = field(default_factory=dict)  # flavour id -> bytes, last measured
    # flavour id -> the last few spawn-to-ready times (a refill competing with cold starts for
    # the CPU takes longer than one on an idle node: the slowest of them is planned for)
    _ready_s: dict[str, deque[float]] = field(default_factory=dict)
    _failures: dict[str, int] = field(default_factory=dict)
    _short_of_memory: set[str] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _watchers: set[asyncio.Task[None]] = field(default_factory=set)  # sandboxes to remove
    _closed: bool = False

    def __post_init__(self) -> None:
        self.metrics = StandbyMetrics(self.registry)
        self.directory.mkdir(parents=True, exist_ok=True)

    # What to keep ------------------------------------------------------------------------------

    def keep(self, plan: dict[str, list[tuple[Flavour, int]]]) -> None:
        """Keep, for each device key, the listed flavours at their counts; every other ready
        standby stops (a GPU that a replica took must not keep a second CUDA context alive)."""
        wanted: dict[Key, int] = {}
        for device, flavours in plan.items():
            for flavour, count in flavours:
                if self._failures.get(flavour.id, 0) >= _MAX_FAILURES:
                    continue
                self.flavours[flavour.id] = flavour
                wanted[(device, flavour.id)] = wanted.get((device, flavour.id), 0) + count
        self.wanted = wanted
        for key, standbys in self.ready.items():
            while len(standbys) > wanted.get(key, 0):
                _stop(standbys.pop())
        for key in list(wanted):
            self._refill(key)
        self._gauges()

    def refill_seconds(self, flavour: Flavour) -> float:
        """How long a standby of `flavour` takes to be ready: the slowest of the last few."""
        measured = self._ready_s.get(flavour.id) or self._ready_s.get(BASE.id)
        return max(measured) if measured else _DEFAULT_READY_S

    # Taking ------------------------------------------------------------------------------------

    def take(self, device: str, need: Flavour | None, holder: str) -> Standby | None:
        """The best ready standby on `device` for a function that needs `need` (None: not known
        yet), or None. Its replacement waits for `release(holder)`."""
        ranked: list[tuple[int, int, Standby]] = []
        env = need.env if need is not None else ()
        for (on, _), standbys in self.ready.items():
            if on != device:
                continue
            for standby in standbys:
                if standby.process.returncode is not None:
                    continue
                flavour = standby.flavour
                if need is not None and flavour.covers(need):
                    rank = 0
                elif flavour == BASE:
                    rank = 1
                elif device and flavour.env == env:
                    rank = 2
                else:
                    continue
                ranked.append((rank, len(flavour.modules), standby))
        if not ranked:
            self.metrics.takes.labels("none").inc()
            return None
        rank, _, standby = min(ranked, key=lambda r: (r[0], r[1]))
        self.metrics.takes.labels(("covering", "generic", "other")[rank]).inc()
        key = (device, standby.flavour.id)
        self.ready[key].remove(standby)
        timer = None
        with contextlib.suppress(RuntimeError):  # no running loop: tests release by hand
            timer = asyncio.get_running_loop().call_later(HOLD_MAX_S, self.release, holder)
        self._holds[holder] = (key, timer)
        self._gauges()
        return standby

    def release(self, holder: str) -> None:
        """The cold start that took a standby is past its first call: start its replacement."""
        hold = self._holds.pop(holder, None)
        if hold is None:
            return
        key, timer = hold
        if timer is not None:
            timer.cancel()
        self._refill(key)

    def ready_count(self, device: str) -> int:
        return sum(
            s.process.returncode is None
            for (on, _), standbys in self.ready.items()
            if on == device
            for s in standbys
        )

    def covering(self, device: str, need: Flavour) -> int:
        """How many ready standbys on `device` have imported all that `need` lists."""
        return sum(
            s.process.returncode is None and s.flavour.covers(need)
            for (on, _), standbys in self.ready.items()
            if on == device
            for s in standbys
        )

    def has_ready(self, device: str) -> bool:
        return self.ready_count(device) > 0

    async def close(self) -> None:
        self._closed = True
        for _, timer in self._holds.values():
            if timer is not None:
                timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for standbys in self.ready.values():
            for standby in standbys:
                kill_group(standby.process)
                await standby.process.wait()
        self.ready.clear()
        if self._watchers:  # the killed standbys' sandboxes go; assigned ones wait no longer
            _, late = await asyncio.wait(set(self._watchers), timeout=5)
            for task in late:
                task.cancel()

    # Starting ----------------------------------------------------------------------------------

    def _refill(self, key: Key) -> None:
        if self._closed:
            return
        held = sum(1 for k, _ in self._holds.values() if k == key)
        have = len(self.ready.get(key, [])) + self._starting.get(key, 0) + held
        flavour = self.flavours[key[1]]
        for _ in range(self.wanted.get(key, 0) - have):
            if not self._memory_allows(flavour):
                self.metrics.skipped.labels("memory").inc()
                break
            self._starting[key] = self._starting.get(key, 0) + 1
            task = asyncio.create_task(self._start(key), name=f"kiln-standby-{key[0] or 'cpu'}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._gauges()

    def _memory_allows(self, flavour: Flavour) -> bool:
        """Whether one more standby of `flavour` fits: the standbys' memory together within the
        budget, and a reserve of the node's memory left free."""
        estimate = self._rss.get(flavour.id, max(self._rss.values(), default=0))
        starting = sum(self._starting.values()) * estimate
        held = sum(s.rss for standbys in self.ready.values() for s in standbys)
        total, available = memory_info()
        fits = held + starting + estimate <= self.memory_budget
        if total:
            fits = fits and available - starting - estimate >= _RESERVE_SHARE * total
        if not fits and flavour.id not in self._short_of_memory:
            self._short_of_memory.add(flavour.id)
            _log.warning(
                "not starting a standby of flavour %s: %.0f MiB of standbys already, budget "
                "%.0f MiB, %.0f MiB of the node's memory available",
                flavour.describe(), held / 2**20, self.memory_budget / 2**20, available / 2**20,
            )  # fmt: skip
        elif fits:
            self._short_of_memory.discard(flavour.id)
        return fits

    async def _start(self, key: Key) -> None:
        device, flavour_id = key
        flavour = self.flavours[flavour_id]
        started = self.clock()
        try:
            standby = await self._spawn(device, flavour)
        except Exception as exc:  # noqa: BLE001 - replicas start the slow way meanwhile
            self._starting[key] -= 1
            failures = self._failures[flavour_id] = self._failures.get(flavour_id, 0) + 1
            if failures >= _MAX_FAILURES:
                _log.error(
                    "standbys of flavour %s failed to start %d times (%s); its functions get "
                    "generic standbys from now on", flavour.describe(), failures, exc,
                )  # fmt: skip
                self.metrics.skipped.labels("failing").inc()
                return
            _log.warning("a standby process failed to start (%s); retrying later", exc)
            await asyncio.sleep(_RETRY_AFTER_S)
            self._refill(key)
            return
        self._starting[key] -= 1
        self._failures.pop(flavour_id, None)
        self._ready_s.setdefault(flavour_id, deque(maxlen=5)).append(self.clock() - started)
        # Resident memory of its processes (a sandbox's cgroup would also count the page cache
        # its imports read, which other processes share).
        pids = standby.box.pids() if standby.box is not None else [standby.process.pid]
        standby.rss = self._rss[flavour_id] = sum(_resident(pid) for pid in pids)
        held = sum(1 for k, _ in self._holds.values() if k == key)
        if self._closed or len(self.ready.get(key, [])) + held >= self.wanted.get(key, 0):
            _stop(standby)  # no longer wanted (the GPU got a replica meanwhile)
            await standby.process.wait()
            return
        self.ready.setdefault(key, []).append(standby)
        self._gauges()

    async def _spawn(self, device: str, flavour: Flavour) -> Standby:
        box = self.sandboxes.make(f"standby-{secrets.token_hex(6)}") if self.sandboxes else None
        try:
            return await self._spawn_in(box, device, flavour)
        except BaseException:
            if box is not None and self.sandboxes is not None:
                self.sandboxes.remove(box)
            raise

    async def _spawn_in(self, box: Box | None, device: str, flavour: Flavour) -> Standby:
        command = [sys.executable, "-P", "-m", "kiln.invoker.standby"]
        if flavour.imports:
            # In a sandbox, only its own read-only directory is there to read it from.
            file = (box.ro if box else self.directory) / f"flavour-{flavour.id}.json"
            if not file.exists():
                temporary = file.with_suffix(f".{os.getpid()}.tmp")
                temporary.write_text(json.dumps({"imports": list(flavour.imports)}))
                temporary.chmod(0o644)
                temporary.replace(file)
            command.append(str(file))
        nice = _WAITING_NICE if can_raise_priority() else 0
        env = self.env_for(device, flavour)
        fds: list[int] = []
        if box is not None and self.sandboxes is not None:
            env["HOME"] = str(box.work)
            command, fds = self.sandboxes.command(box, command, devices=gpu_devices(device))
            preexec = self.sandboxes.preexec(box, nice=nice, parent_pid=os.getpid())
        else:
            # Killed with its agent: a standby may be serving as a replica by then, which
            # nobody would meter or stop any more (kiln.invoker.agent says the same).
            preexec = die_with_parent(signal.SIGKILL, os.getpid(), nice=nice)
        log = open(self.directory / "standby.log", "ab")  # noqa: SIM115, ASYNC230 - a local file
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                cwd=self.directory,
                env=env,
                start_new_session=True,
                pass_fds=fds,
                preexec_fn=preexec,
            )
        finally:
            log.close()
            for fd in fds:
                os.close(fd)
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), _READY_TIMEOUT_S)
        except TimeoutError:
            line = b""
        except BaseException:  # cancelled (the pool is closing): the process must not outlive it
            kill_group(process)
            raise
        if line != READY:
            kill_group(process)
            await process.wait()
            raise RuntimeError(f"it exited with status {process.returncode} before it was ready")
        standby = Standby(device, flavour, process, niced=bool(nice), box=box)
        if box is not None:
            task = asyncio.create_task(self._remove_when_done(standby), name="kiln-standby-box")
            self._watchers.add(task)
            task.add_done_callback(self._watchers.discard)
        return standby

    async def _remove_when_done(self, standby: Standby) -> None:
        """A standby that exits unassigned takes its sandbox with it (an assigned one's goes
        when its replica exits: the agent removes it)."""
        try:
            await standby.process.wait()
        finally:
            if not standby.assigned and standby.box is not None and self.sandboxes is not None:
                self.sandboxes.remove(standby.box)

    def _gauges(self) -> None:
        ready = [s for standbys in self.ready.values() for s in standbys]
        self.metrics.standbys.labels("ready").set(len(ready))
        self.metrics.standbys.labels("starting").set(sum(self._starting.values()))
        self.metrics.memory.set(sum(s.rss for s in ready))
        self.metrics.flavours.set(len({flavour for _, flavour in self.wanted}))


def _stop(standby: Standby) -> None:
    kill_group(standby.process)  # reaped by its transport


def kill_group(process: asyncio.subprocess.Process) -> None:
    """SIGKILL a standby's whole process group (it leads one of its own). Under a sandbox, a
    kill of bwrap alone can leave its child in the new namespaces waiting forever for a go
    that never comes (blocked on bwrap's eventfd, before its own parent-death signal is set):
    seen as orphans with no children."""
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    if process.pid > 0:  # never 0: that would be this process's own group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

"""Start, health-check and stop the embedded NATS, PostgreSQL and Redis as one unit.

Layout under the stack's root (`$KILN_HOME/dev` for `kiln dev`):

    lock          held (flock) by the one process that owns the stack; the kernel releases it
                  when that process dies, however it dies
    state.json    pids and ports of the running servers, so a later start can stop strays and
                  reuse the same ports
    nats/ postgres/ redis/   data, kept across restarts
    logs/         one log per server

Only the services whose `KILN_*_URL` is unset are started; the others are used as they are.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from kiln.devstack.nats import EmbeddedNats
from kiln.devstack.ports import pick_port
from kiln.devstack.postgres import EmbeddedPostgres
from kiln.devstack.process import is_gone, stop_stray
from kiln.devstack.redis import EmbeddedRedis
from kiln.devstack.service import EmbeddedService
from kiln.errors import DevStackBusy, DevStackError, DevStackPortTaken
from kiln.settings import Settings

__all__ = ["DevStack", "StackState", "embedded_services"]

_SERVICES: tuple[tuple[str, type[EmbeddedService]], ...] = (
    ("nats_url", EmbeddedNats),
    ("database_url", EmbeddedPostgres),
    ("redis_url", EmbeddedRedis),
)
# Another program may bind a port between our choice and the server's bind; then we choose again.
_PORT_ATTEMPTS = 4


def embedded_services(settings: Settings) -> list[str]:
    """Names of the services a DevStack would start for `settings` (those without a URL)."""
    return [kind.name for attr, kind in _SERVICES if getattr(settings, attr) is None]


@dataclass(frozen=True)
class StackState:
    """One server as `state.json` records it. `pid` and `create_time` together identify the
    process even after its pid is reused; both are None once it stopped."""

    name: str
    pid: int | None
    create_time: float | None
    ports: dict[str, int]
    url: str


class DevStack:
    """The embedded services for one data directory.

    Use it as a context manager: entering starts what `settings` does not point elsewhere and
    returns settings whose URLs name every service; leaving stops, in reverse order, what it
    started. A second DevStack on the same directory fails with `DevStackBusy` while the first
    one lives. Start it from the main thread (see kiln.devstack.process).
    """

    def __init__(
        self,
        settings: Settings,
        root: Path | None = None,
        *,
        durable: bool = True,
        start_timeout_s: float = 60.0,
        stop_timeout_s: float = 15.0,
    ) -> None:
        self.settings = settings
        # Resolved, because stray servers are recognised by their data directory argument.
        self.root = (root or settings.dev_dir).resolve()
        self.durable = durable
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.services: list[EmbeddedService] = []
        self._lock_file: IO[str] | None = None

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def __enter__(self) -> Settings:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Settings:
        self.root.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            previous = {entry.name: entry for entry in self._read_state()}
            self._stop_strays(previous.values())
            changes: dict[str, Any] = {}
            for attr, kind in _SERVICES:
                if getattr(self.settings, attr) is None:
                    old = previous.get(kind.name)
                    changes[attr] = self._start_service(kind, old.ports if old else {})
                    changes.update(self.services[-1].settings())
        except BaseException:
            self.stop()
            raise
        return self.settings.replace(**changes)

    def _start_service(self, kind: type[EmbeddedService], old_ports: dict[str, int]) -> str:
        taken = {port for service in self.services for port in service.ports.values()}
        preferred: dict[str, list[int | None]] = {
            key: [old_ports.get(key), default] for key, default in kind.default_ports.items()
        }
        for attempt in range(_PORT_ATTEMPTS):
            ports: dict[str, int] = {}
            for key, candidates in preferred.items():
                ports[key] = pick_port(candidates if attempt == 0 else [], taken)
                taken.add(ports[key])
            service = kind(self.root, ports, durable=self.durable)
            self.services.append(service)
            try:
                service.start(self.start_timeout_s)
            except DevStackPortTaken:
                self.services.remove(service)
                service.stop(self.stop_timeout_s)
                if attempt == _PORT_ATTEMPTS - 1:
                    raise
                continue
            self._write_state()
            return service.url
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop what this stack started, newest first, each within the stop timeout.

        A Ctrl-C that arrives meanwhile does not cut the stop short (that would leave servers
        running until the parent-death signal catches them); the stop simply goes on.
        """
        errors: list[str] = []
        for service in reversed(self.services):
            while True:
                try:
                    service.stop(self.stop_timeout_s)
                    break
                except KeyboardInterrupt:
                    continue
                except Exception as exc:  # noqa: BLE001 - keep stopping the others
                    errors.append(f"{service.name}: {exc}")
                    break
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                self._write_state()
            self._lock_file.close()  # closing the descriptor releases the flock
            self._lock_file = None
        self.services.clear()
        if errors:
            raise DevStackError("could not stop every embedded service: " + "; ".join(errors))

    def record_state(self) -> None:
        """Write the servers' pids down again (after the supervisor restarted one)."""
        with contextlib.suppress(OSError):
            self._write_state()

    def state(self) -> list[StackState]:
        """The servers this stack started; pid None for one that no longer runs."""
        entries = []
        for service in self.services:
            process = service.process
            running = process is not None and process.running
            entries.append(
                StackState(
                    name=service.name,
                    pid=process.pid if running and process is not None else None,
                    create_time=process.create_time if running and process is not None else None,
                    ports=dict(service.ports),
                    url=service.url,
                )
            )
        return entries

    def _acquire_lock(self) -> None:
        lock_path = self.root / "lock"
        lock_file = open(lock_path, "a+")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            owner = lock_file.read().strip() or "unknown"
            lock_file.close()
            raise DevStackBusy(
                f"another kiln process (pid {owner}) is already running the embedded services "
                f"in {self.root}; stop it first (Ctrl-C in its terminal, or `kill {owner}`), or "
                "set KILN_HOME to use another directory"
            ) from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(str(os.getpid()))
        lock_file.flush()
        self._lock_file = lock_file

    def _read_state(self) -> list[StackState]:
        try:
            data = json.loads(self.state_path.read_text())
            return [StackState(**entry) for entry in data["services"]]
        except (OSError, ValueError, KeyError, TypeError):
            return []  # no state, or an older or damaged file: nothing to reuse or clean up

    def _write_state(self) -> None:
        # Ports stay recorded after a stop so the next start offers the same URLs again.
        data = {"owner_pid": os.getpid(), "services": [asdict(entry) for entry in self.state()]}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.state_path)

    def _stop_strays(self, previous: Iterable[StackState]) -> None:
        """We hold the lock, so any server recorded by an earlier owner is a leftover."""
        kinds = {kind.name: kind for _, kind in _SERVICES}
        for entry in previous:
            kind = kinds.get(entry.name)
            if entry.pid is None or kind is None or is_gone(entry.pid):
                continue
            stop_stray(
                entry.pid,
                str(self.root / entry.name),
                create_time=entry.create_time,
                sig=kind.stop_signal,
            )

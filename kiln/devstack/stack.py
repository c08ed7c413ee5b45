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
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from kiln.devstack.nats import EmbeddedNats
from kiln.devstack.ports import pick_port
from kiln.devstack.postgres import EmbeddedPostgres
from kiln.devstack.process import is_gone, stop_stray
from kiln.devstack.redis import EmbeddedRedis
from kiln.devstack.service import EmbeddedService
from kiln.errors import DevStackBusy, DevStackError
from kiln.settings import Settings

__all__ = ["DevStack", "StackState"]

_SERVICES: tuple[tuple[str, type[EmbeddedService]], ...] = (
    ("nats_url", EmbeddedNats),
    ("database_url", EmbeddedPostgres),
    ("redis_url", EmbeddedRedis),
)


@dataclass(frozen=True)
class StackState:
    """What `state.json` records about one running server."""

    name: str
    pid: int
    ports: dict[str, int]
    url: str


class DevStack:
    """The embedded services for one data directory.

    Use it as a context manager: entering starts what `settings` does not point elsewhere and
    returns settings whose URLs name every service; leaving stops, in reverse order, what it
    started. A second DevStack on the same directory fails with `DevStackBusy` while the first
    one lives.
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
        # Resolved, because stray servers are recognised by this path in their command line.
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
            previous = self._read_state()
            self._stop_strays(previous)
            urls: dict[str, str] = {}
            taken: set[int] = set()
            for attr, kind in _SERVICES:
                if getattr(self.settings, attr) is not None:
                    continue
                old_ports = previous.get(kind.name, {}).get("ports", {})
                ports = {
                    key: pick_port([old_ports.get(key), default], taken)
                    for key, default in kind.default_ports.items()
                }
                taken.update(ports.values())
                service = kind(self.root, ports, durable=self.durable)
                self.services.append(service)
                service.start(self.start_timeout_s)
                self._write_state()
                urls[attr] = service.url
        except BaseException:
            self.stop()
            raise
        return self.settings.replace(**urls)

    def stop(self) -> None:
        """Stop what this stack started, newest first, each within the stop timeout."""
        errors: list[str] = []
        for service in reversed(self.services):
            try:
                service.stop(self.stop_timeout_s)
            except Exception as exc:  # noqa: BLE001 - keep stopping the others, report at the end
                errors.append(f"{service.name}: {exc}")
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                self._write_state()
            self._lock_file.close()  # closing the descriptor releases the flock
            self._lock_file = None
        self.services.clear()
        if errors:
            raise DevStackError("could not stop every embedded service: " + "; ".join(errors))

    def state(self) -> list[StackState]:
        return [
            StackState(s.name, s.process.pid, dict(s.ports), s.url)
            for s in self.services
            if s.process is not None
        ]

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

    def _read_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        services = data.get("services", {}) if isinstance(data, dict) else {}
        return services if isinstance(services, dict) else {}

    def _write_state(self) -> None:
        # Ports stay recorded after a stop so the next start offers the same URLs again.
        services = {
            s.name: {
                "pid": s.process.pid if s.process is not None and s.process.running else None,
                "ports": s.ports,
                "url": s.url,
            }
            for s in self.services
        }
        data = {"owner_pid": os.getpid(), "services": services}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.state_path)

    def _stop_strays(self, previous: dict[str, Any]) -> None:
        """We hold the lock, so any server recorded by an earlier owner is a leftover."""
        for record in previous.values():
            pid = record.get("pid") if isinstance(record, dict) else None
            if isinstance(pid, int) and not is_gone(pid):
                stop_stray(pid, str(self.root.resolve()))

"""What every embedded server has in common: a binary from a pip package, a data directory,
ports, a readiness probe and a URL."""

from __future__ import annotations

import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

from kiln.devstack.process import ManagedProcess, ProcessSpec
from kiln.errors import DevStackError, DevStackPortTaken

__all__ = ["EmbeddedService", "find_packaged_file"]

_POLL_S = 0.05


def find_packaged_file(distribution: str, suffix: str, setting_var: str) -> Path:
    """Locate the file whose path ends with `suffix` installed by pip package `distribution`
    (console scripts included)."""
    missing = DevStackError(
        f"{setting_var} is not set and the embedded server from the {distribution!r} package is "
        f"not installed; install it with `pip install 'kiln[embedded]'`, or set {setting_var} "
        "to a server that is already running"
    )
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise missing from None
    for entry in dist.files or ():
        if entry.as_posix().endswith(suffix):
            path = Path(str(dist.locate_file(entry))).resolve()
            if path.is_file():
                return path
    raise missing


class EmbeddedService(ABC):
    """One server process under `root/<name>/`."""

    name: str
    setting_var: str
    default_ports: ClassVar[dict[str, int]]
    # The server's clean, prompt shutdown; also what the kernel sends it if its parent dies.
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(self, root: Path, ports: dict[str, int], *, durable: bool) -> None:
        self.root = root
        self.ports = ports
        # `durable` keeps every write across crashes (kiln dev); tests trade that for speed.
        self.durable = durable
        self.process: ManagedProcess | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / self.name

    @property
    def log_path(self) -> Path:
        return self.root / "logs" / f"{self.name}.log"

    @property
    def port(self) -> int:
        return self.ports["port"]

    @property
    @abstractmethod
    def url(self) -> str: ...

    def prepare(self) -> None:
        """One-time set-up of the data directory (idempotent)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)

    @abstractmethod
    def process_spec(self) -> ProcessSpec: ...

    @abstractmethod
    def probe(self) -> bool:
        """True once the server answers like a healthy one."""

    def settings(self) -> dict[str, Any]:
        """Settings besides the URL that the platform needs to use the server."""
        return {}

    def after_ready(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Set-up that needs the running server (creating the database, for example)."""

    def start(self, timeout_s: float) -> None:
        self.spawn()
        self.wait_ready(timeout_s)

    def spawn(self) -> None:
        """Start the server process (from the main thread: kiln.devstack.process)."""
        self.prepare()
        self.process = ManagedProcess(self.process_spec())
        self.process.start()

    def wait_ready(self, timeout_s: float) -> None:
        """Until the server answers, then its set-up (any thread may wait)."""
        self.wait_until(self.probe, timeout_s, "answer")
        self.after_ready()

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.process.check_alive()
            except DevStackError as exc:
                if "address already in use" in self.process.log_tail().lower():
                    raise DevStackPortTaken(exc.message) from exc
                raise
            if ready():
                return
            if time.monotonic() > deadline:
                raise DevStackError(
                    f"embedded {self.name} did not {what} within {timeout_s:g} s; the end of its "
                    f"log ({self.log_path}):\n{self.process.log_tail()}"
                )
            time.sleep(_POLL_S)

    def stop(self, timeout_s: float) -> None:
        if self.process is not None:
            self.process.stop(timeout_s)

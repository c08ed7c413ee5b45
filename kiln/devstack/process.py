"""Child processes that cannot outlive their parent.

Every embedded server is started in its own session (so a Ctrl-C in the terminal reaches only
`kiln dev`, which then stops the servers in order) and with a parent-death signal (so a parent
killed with SIGKILL or crashing still takes its servers down). Processes that escaped anyway,
for example on a platform without parent-death signals, are found through the pid file and
stopped by the next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from kiln.errors import DevStackError

__all__ = ["ManagedProcess", "ProcessSpec", "identity", "is_gone", "stop_stray"]

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    argv: Sequence[str]
    log_path: Path
    # Sent by the kernel when the parent dies, and by `stop()`. Each server has its own fast,
    # clean shutdown signal (PostgreSQL's is SIGINT; SIGTERM would wait for clients).
    stop_signal: signal.Signals = signal.SIGTERM
    user: str | None = None
    env: dict[str, str] | None = None
    cwd: Path | None = None


def identity(user: str | None) -> dict[str, Any]:
    """subprocess arguments that run a child as `user` with that user's group only. Changing
    the uid alone would keep root's group, whose (usually empty) permission bits then apply."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _die_with_parent(sig: signal.Signals, parent_pid: int) -> Callable[[], None]:
    """Runs in the child between fork and exec (after any uid change, which would clear it)."""

    def setup() -> None:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody would ever signal us.
        if os.getppid() != parent_pid:
            os._exit(1)

    return setup


class ManagedProcess:
    def __init__(self, spec: ProcessSpec) -> None:
        self.spec = spec
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise DevStackError(f"{self.spec.name} was never started")
        return self._popen.pid

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> None:
        self.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spec.log_path, "ab") as log:
            try:
                self._popen = subprocess.Popen(
                    list(self.spec.argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.spec.cwd,
                    env=self.spec.env,
                    **identity(self.spec.user),
                    start_new_session=True,
                    preexec_fn=_die_with_parent(self.spec.stop_signal, os.getpid()),
                    close_fds=True,
                )
            except OSError as exc:
                raise DevStackError(
                    f"could not start {self.spec.name} ({self.spec.argv[0]}): {exc}"
                ) from exc

    def check_alive(self) -> None:
        """Raise with the end of the log if the process has already exited."""
        if self._popen is not None and self._popen.poll() is not None:
            raise DevStackError(
                f"{self.spec.name} exited with status {self._popen.returncode} while starting; "
                f"the end of its log ({self.spec.log_path}):\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.spec.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float) -> None:
        """Ask the process to shut down cleanly; kill it if it is still there after `timeout_s`."""
        if self._popen is None or self._popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._popen.send_signal(self.spec.stop_signal)
        try:
            self._popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self._popen.kill()
            self._popen.wait(5)


def is_gone(pid: int) -> bool:
    """True when `pid` no longer runs (a zombie waiting for its reaper counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def stop_stray(pid: int, marker: str, timeout_s: float = 10.0) -> bool:
    """Stop a process left behind by an earlier run, if `pid` is still that process.

    `marker` (the data directory) must appear in its command line, so a recycled pid that now
    belongs to something else is never touched. Returns True if a process was stopped.
    """
    try:
        proc = psutil.Process(pid)
        if not any(marker in part for part in proc.cmdline()):
            return False
        proc.terminate()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if is_gone(pid):
            return True
        time.sleep(0.05)
    with contextlib.suppress(psutil.NoSuchProcess):
        proc.kill()
    return True

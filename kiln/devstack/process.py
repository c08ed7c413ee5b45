"""Child processes that cannot outlive their parent.

Every embedded server is started in its own session (so a Ctrl-C in the terminal reaches only
`kiln dev`, which then stops the servers in order) and with a parent-death signal (so a parent
killed with SIGKILL or crashing still takes its servers down). Processes that escaped anyway,
for example on a platform without parent-death signals, are found through the pid file and
stopped by the next start.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from kiln._proc import die_with_parent
from kiln.errors import DevStackError

__all__ = ["SERVER_ENV", "ManagedProcess", "ProcessSpec", "identity", "is_gone", "stop_stray"]

# Servers and their tools get a fixed, minimal environment: nothing of the user's (PGSSLMODE,
# PGUSER, cloud credentials, Kiln's own secrets) leaks in or changes how they behave.
SERVER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    argv: Sequence[str]
    log_path: Path
    # Sent by the kernel when the parent dies, and by `stop()`. Each server has its own fast,
    # clean shutdown signal (PostgreSQL's is SIGINT; SIGTERM would wait for clients).
    stop_signal: signal.Signals = signal.SIGTERM
    user: str | None = None


def identity(user: str | None) -> dict[str, Any]:
    """subprocess arguments that run a child as `user` with that user's group only. Changing
    the uid alone would keep root's group, whose (usually empty) permission bits then apply."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


class ManagedProcess:
    def __init__(self, spec: ProcessSpec) -> None:
        self.spec = spec
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_offset = 0  # the log is shared by every run; this run's part starts here

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise DevStackError(f"{self.spec.name} was never started")
        return self._popen.pid

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def wait(self, timeout_s: float) -> int | None:
        """Its exit status once it has exited, within `timeout_s`; None if it still runs."""
        if self._popen is None:
            return None
        try:
            return self._popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    @property
    def create_time(self) -> float | None:
        """The kernel's start time of the process: with the pid, it names this process even
        after the pid has been reused."""
        try:
            return psutil.Process(self.pid).create_time()
        except psutil.Error:
            return None

    def start(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise DevStackError(
                f"{self.spec.name} must be started from the main thread: its parent-death "
                "signal fires when the starting thread ends"
            )
        self.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spec.log_path, "ab") as log:
            self._log_offset = log.tell()
            try:
                self._popen = subprocess.Popen(
                    list(self.spec.argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=SERVER_ENV,
                    **identity(self.spec.user),
                    start_new_session=True,
                    preexec_fn=die_with_parent(self.spec.stop_signal, os.getpid()),
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
        """The last lines this run wrote to the log."""
        try:
            with open(self.spec.log_path, "rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
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


def stop_stray(
    pid: int,
    data_dir: str,
    *,
    create_time: float | None = None,
    sig: signal.Signals = signal.SIGTERM,
    timeout_s: float = 10.0,
) -> bool:
    """Stop a server left behind by an earlier run, if `pid` is still that server.

    The process must have `data_dir` as one of its arguments and, when `create_time` is known,
    have started at that time, so a recycled pid (or a `tail` of a log file) is never touched.
    Returns True if a process was stopped.
    """
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.01:
            return False
        if data_dir not in proc.cmdline():
            return False
        proc.send_signal(sig)
    except psutil.Error:
        return False
    for _ in range(2):  # the requested signal, then SIGKILL
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if is_gone(pid):
                return True
            time.sleep(0.05)
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return is_gone(pid)

"""Child processes that die with their parent (used for embedded servers and replicas), and
the CPU priority of those that wait in the background (standbys)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["can_raise_priority", "die_with_parent", "raise_priority"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals, parent_pid: int, *, nice: int = 0) -> Callable[[], None]:
    """Runs in the child between fork and exec (after any uid change, which would clear it).

    The kernel sends the signal when the *thread* that forked the child ends, so servers must
    be started from the main thread (ManagedProcess.start checks). `prctl` is looked up here,
    in the parent: loading a library in the forked child of a threaded process can deadlock.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

    def setup() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody would ever signal us.
        if os.getppid() != parent_pid:
            os._exit(1)
        if nice:
            os.nice(nice)

    return setup


def can_raise_priority() -> bool:
    """Whether this process may give a process it lowered its CPU priority back (root, or a
    nice limit that allows it): only then is lowering it worth doing."""
    if os.geteuid() == 0:
        return True
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return soft == resource.RLIM_INFINITY or soft >= 20


def raise_priority(pid: int) -> None:
    """Every thread of `pid` back to nice 0 (Linux keeps a nice value per thread; threads the
    process starts later inherit the main thread's, which goes first)."""
    tasks = Path(f"/proc/{pid}/task")
    try:
        tids = sorted((int(t) for t in os.listdir(tasks)), key=lambda t: t != pid)
    except OSError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.setpriority(os.PRIO_PROCESS, tid, 0)

"""Child processes that die with their parent (used for embedded servers and replicas)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals, parent_pid: int) -> Callable[[], None]:
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

    return setup

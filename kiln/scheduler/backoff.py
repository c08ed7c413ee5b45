"""Crash-loop backoff: a function whose replicas keep failing is started again later and later,
so a broken deploy (an import error, a model that does not fit) does not churn a node's slots
and flood its logs. The n-th failure in a row holds new starts for `2**n` seconds, at most
`BACKOFF_CAP_S`; a replica of the function becoming ready resets the count.

A failure is an exit the scheduler did not ask for with a non-zero status: a drained or stopped
replica exiting is no crash. Pure bookkeeping on monotonic times the caller passes in.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping

__all__ = ["BACKOFF_CAP_S", "CrashLoops", "backoff_s", "crashed"]

BACKOFF_CAP_S = 60.0


def backoff_s(failures: int) -> float:
    """How long new starts wait after the `failures`-th failure in a row."""
    return min(BACKOFF_CAP_S, 2.0**failures)


def crashed(exit_event: Mapping[str, object]) -> bool:
    """Whether a node agent's exit event tells of a crash: a non-zero status nobody asked for."""
    return exit_event.get("exit_code") != 0 and not exit_event.get("requested")


class CrashLoops:
    def __init__(self) -> None:
        self.failures: dict[uuid.UUID, int] = {}
        self.until: dict[uuid.UUID, float] = {}

    def failed(self, function_id: uuid.UUID, now: float) -> float:
        """Count a failure at `now` (monotonic); returns how long starts are held."""
        count = self.failures.get(function_id, 0) + 1
        self.failures[function_id] = count
        delay = backoff_s(count)
        self.until[function_id] = now + delay
        return delay

    def succeeded(self, function_id: uuid.UUID) -> None:
        """A replica became ready: the next failure waits the shortest time again. A hold
        already running is served out (at most the cap)."""
        self.failures.pop(function_id, None)

    def holds(self, function_id: uuid.UUID, now: float) -> bool:
        return self.until.get(function_id, -math.inf) > now

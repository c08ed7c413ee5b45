"""Time as a dependency. The scheduler, the leader lease it holds and the rows they write read
time only through a `Clock`, so unit tests drive lost nodes, crash-loop backoff and leader
takeover with a `FakeClock`: no real time passes and nothing flakes under load (Ray Serve's
controller tests do the same). Standard library only.

Two readings, for two jobs: `monotonic()` measures ages and deadlines inside one process (it
never jumps when the wall clock is set); `wall()` is epoch seconds, for what other processes
read or wrote (a replica's `idle_since`, a launch's `requested_at`, a row's timestamp).

There is no `sleep`: the loops wait for an event (a wake-up, a stop) with a timeout, and tests
run one pass or one lease attempt at a time instead of letting a loop sleep.
"""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "FakeClock", "SystemClock"]


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that only moves forward: for ages and deadlines."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch: for times other processes and the database see."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


SYSTEM_CLOCK = SystemClock()


class FakeClock:
    """A clock that moves only when told to: both readings advance together."""

    def __init__(self, *, wall: float = 1_700_000_000.0, monotonic: float = 1_000.0) -> None:
        self._wall = wall
        self._monotonic = monotonic

    def monotonic(self) -> float:
        return self._monotonic

    def wall(self) -> float:
        return self._wall

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock does not go back; got advance({seconds})")
        self._monotonic += seconds
        self._wall += seconds

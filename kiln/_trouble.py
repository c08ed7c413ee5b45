"""Saying a recurring failure once. A loop that retries a dependency (NATS, PostgreSQL) until it
answers would otherwise log every attempt, burying the one line that matters: what it waits
for, since when, and when it works again."""

from __future__ import annotations

import logging
import time

__all__ = ["Trouble"]


class Trouble:
    """`failed(exc)` logs the first failure of a run of them, with its traceback; `ok()` logs,
    once, that it works again and how long it did not."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log = log
        self.what = what
        self.since: float | None = None
        self.failures = 0

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self.since is None:
            self.since = time.monotonic()
            self.log.warning(
                "%s failed (%s: %s); retrying until it works",
                self.what, type(exc).__name__, exc, exc_info=exc,
            )  # fmt: skip

    def ok(self) -> None:
        if self.since is not None:
            self.log.warning(
                "%s works again, after %.1f s and %d failed attempts",
                self.what, time.monotonic() - self.since, self.failures,
            )  # fmt: skip
        self.since = None
        self.failures = 0

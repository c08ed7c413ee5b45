"""Stopping owned tasks for sure.

On Python 3.11, `asyncio.wait_for` can swallow a cancellation that arrives just as the awaited
thing finishes (gh-86296, fixed in 3.12), and nats-py waits for every request, publish
acknowledgement and fetch with `wait_for`. A task cancelled once may then carry on as if nothing
happened, and whoever awaits it waits forever. `cancel_and_wait` cancels again until the task
is done, within a bound.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["cancel_and_wait"]

_log = logging.getLogger("kiln.tasks")
_RETRY_S = 0.2


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None, within_s: float = 10.0) -> None:
    """Cancel `tasks` (None is skipped) and wait until each is done, cancelling again while one
    carries on; after `within_s` the ones still running are left, and logged."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    pending = {t for t in tasks if t is not None and not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            _log.error("tasks still running after cancellation: %s", sorted(map(repr, pending)))
            return
        _, pending = await asyncio.wait(pending, timeout=min(_RETRY_S, left))
    for ended in tasks:
        if ended is not None and ended.done() and not ended.cancelled():
            error = ended.exception()
            if error is not None:
                _log.error("a task ended with %s: %s", type(error).__name__, error)

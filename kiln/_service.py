"""The `main()` of every platform service that runs as a process of its own (`python -m
kiln.billing`, `kiln.scheduler`, `kiln.invoker`): logging, the one `Settings`, signals and a
bounded stop.

SIGTERM or SIGINT sets the service's `stop` event; the service then has
`KILN_SHUTDOWN_TIMEOUT` (plus a margin for closing connections) to return before it is
cancelled. Exit status: 0 after a clean stop, 1 when the service failed or overstayed, 2 for
invalid settings (as the `kiln` command).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from kiln import _loop
from kiln._tasks import cancel_and_wait
from kiln.errors import ConfigError, KilnError
from kiln.settings import Settings

__all__ = ["run_service"]

_log = logging.getLogger("kiln.service")
# Beyond the drain: closing NATS and the database pool, and the metrics server's last poll.
_CLOSE_MARGIN_S = 10.0

Serve = Callable[[Settings, asyncio.Event], Coroutine[Any, Any, None]]


def run_service(serve: Serve) -> None:
    """Run `serve(settings, stop)` until it returns; SIGTERM and SIGINT set `stop`."""
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(
        level=settings.log_level.value.upper(), format="%(asctime)s %(name)s %(message)s"
    )
    try:
        code = _loop.run(_serve_until_stopped(serve, settings))
    except ConfigError as exc:  # e.g. the metrics port is taken
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(2)
    except KilnError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)


async def _serve_until_stopped(serve: Serve, settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    serving = asyncio.create_task(serve(settings, stop), name="kiln-service")
    stopped = asyncio.create_task(stop.wait(), name="kiln-service-stop")
    try:
        await asyncio.wait({serving, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not serving.done():
            bound = settings.shutdown_timeout_s + _CLOSE_MARGIN_S
            await asyncio.wait({serving}, timeout=bound)
            if not serving.done():
                _log.error("the service did not stop within %g s; cancelling it", bound)
                await cancel_and_wait(serving)
                return 1
        await serving  # what it raised, if anything
        return 0
    finally:
        stopped.cancel()

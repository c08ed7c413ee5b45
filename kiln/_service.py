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
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from kiln import _loop
from kiln._nats import connect_options
from kiln._tasks import cancel_and_wait
from kiln.errors import ConfigError, KilnError
from kiln.settings import Settings

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from prometheus_client import CollectorRegistry

    from kiln.observability.nats import NatsMetrics, NatsProcess

__all__ = ["open_metrics", "open_nats", "run_service"]

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


async def open_nats(
    exits: contextlib.AsyncExitStack,
    settings: Settings,
    process: NatsProcess,
    nats_metrics: NatsMetrics,
) -> NATS:
    """The service's NATS connection, drained by `exits`; it reconnects for as long as NATS
    stays away (a service waits for it, however long), and its state is in `nats_metrics`."""
    import nats

    nc = await nats.connect(
        **connect_options(settings, name=f"kiln-{process.value.replace('_', '-')}"),
        max_reconnect_attempts=-1,
        **nats_metrics.callbacks(process),
    )
    exits.push_async_callback(nc.drain)
    return nc


async def open_metrics(
    exits: contextlib.AsyncExitStack, settings: Settings, registries: Sequence[CollectorRegistry]
) -> None:
    """Serve `registries` on `KILN_METRICS_PORT` until `exits` closes."""
    from kiln.observability.exposition import serve_metrics

    await exits.enter_async_context(
        serve_metrics(registries, host=settings.host, port=settings.metrics_port)
    )

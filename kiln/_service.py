"""The skeleton of every platform process: `main()` for each service that runs as a process of
its own (`python -m kiln.router`, `kiln.scheduler`, `kiln.invoker`, `kiln.billing`) with
logging, the one `Settings`, signals and a bounded stop; and the helpers with which every
process, `kiln dev`'s included, opens NATS, PostgreSQL, Redis, health and metrics, each
registered on the process's one `AsyncExitStack` as it opens, so they close in reverse order.

NATS reconnects forever (kiln._nats); PostgreSQL's pool checks a connection before lending it,
and Redis opens a fresh one per failed command, so neither needs a person after an outage.

SIGTERM or SIGINT sets the service's `stop` event; the service then has
`KILN_SHUTDOWN_TIMEOUT` (plus a margin for closing connections) to return before it is
cancelled. Exit status: 0 after a clean stop, 1 when the service failed or overstayed, 2 for
invalid settings (as the `kiln` command).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from kiln import _loop
from kiln._health import Health
from kiln._nats import NatsLink
from kiln._tasks import cancel_and_wait
from kiln.errors import ConfigError, KilnError
from kiln.settings import Settings

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from prometheus_client import CollectorRegistry
    from redis.asyncio import Redis
    from sqlalchemy.ext.asyncio import AsyncEngine

    from kiln.observability.nats import NatsMetrics, NatsProcess

__all__ = [
    "StoppedBeforeReady",
    "close_nats",
    "open_database",
    "open_health",
    "open_metrics",
    "open_nats",
    "open_redis",
    "push_bounded",
    "run_service",
    "start_part",
]

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
        try:
            await serving  # what it raised, if anything
        except StoppedBeforeReady:
            _log.info("stopped before it was ready")
        return 0
    finally:
        stopped.cancel()


class StoppedBeforeReady(Exception):
    """Raised by `open_nats(stop=...)` when the service is told to stop while it still waits
    for NATS; the service then ends cleanly."""


async def close_nats(nc: NATS) -> None:
    """Drain `nc` (let subscriptions finish what they hold); if that cannot happen (NATS is
    away: drain refuses while reconnecting, or overruns), close it, so it stops reconnecting."""
    try:
        await asyncio.wait_for(nc.drain(), CLOSE_WITHIN_S)
    except Exception as exc:  # noqa: BLE001 - closing anyway
        _log.info("NATS connection closed without draining (%s: %s)", type(exc).__name__, exc)
    finally:
        if not nc.is_closed:
            await nc.close()


# A close that takes longer is abandoned (and logged), so the next ones still run.
CLOSE_WITHIN_S = 5.0


def push_bounded(
    exits: contextlib.AsyncExitStack,
    close: Callable[[], Awaitable[object]],
    what: str,
    *,
    within_s: float = CLOSE_WITHIN_S,
) -> None:
    """Register `close` on `exits`, bounded by `within_s`; its failure is logged, not raised,
    so that closing what was opened before it still happens."""

    async def bounded() -> None:
        try:
            async with asyncio.timeout(within_s):
                await close()
        except TimeoutError:
            _log.error("closing %s took longer than %g s; left behind", what, within_s)
        except Exception as exc:  # noqa: BLE001 - shutting down: say it and close the rest
            _log.warning("closing %s failed: %s: %s", what, type(exc).__name__, exc)

    exits.push_async_callback(bounded)


def start_part(
    exits: contextlib.AsyncExitStack,
    run: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
    name: str,
    *,
    within_s: float,
) -> asyncio.Task[None]:
    """Run `run(stop)` as a task owned by `exits`: when `exits` closes, its `stop` is set and it
    has `within_s` to return before it is cancelled. The task is returned so the process can
    notice a part that ended by itself."""
    stop = asyncio.Event()
    task = asyncio.create_task(run(stop), name=name)

    async def close() -> None:
        stop.set()
        done, _ = await asyncio.wait({task}, timeout=within_s)
        if not done:
            _log.error("%s did not stop within %g s; cancelling it", name, within_s)
            await cancel_and_wait(task)
        elif not task.cancelled() and task.exception() is not None:
            _log.error("%s failed: %r", name, task.exception())

    exits.push_async_callback(close)
    return task


async def open_health(exits: contextlib.AsyncExitStack, settings: Settings) -> Health:
    """The process's health, its event-loop watch running until `exits` closes."""
    health = Health(settings)
    ticking = asyncio.create_task(health.tick(), name="kiln-health")
    exits.push_async_callback(cancel_and_wait, ticking)
    return health


async def open_nats(
    exits: contextlib.AsyncExitStack,
    settings: Settings,
    process: NatsProcess,
    nats_metrics: NatsMetrics,
    *,
    health: Health | None = None,
    name: str | None = None,
    stop: asyncio.Event | None = None,
) -> NatsLink:
    """The process's NATS connection (`link.client`), closed by `exits`. Opening it waits for
    NATS however long it takes (saying so once), or until `stop` is set (then it raises
    `StoppedBeforeReady`); once open, it reconnects for as long as NATS stays away. Its state
    is in `nats_metrics`, and in `health` when given."""
    link = NatsLink(
        name or f"kiln-{process.value.replace('_', '-')}", metrics=nats_metrics, process=process
    )
    if health is not None:
        health.watch(link)
    connecting = asyncio.ensure_future(link.connect(settings))
    stopping = asyncio.ensure_future(stop.wait() if stop is not None else asyncio.Future())
    try:
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(stopping)
        if not connecting.done():
            await cancel_and_wait(connecting)
            if link.nc is not None and not link.nc.is_closed:
                await link.nc.close()
    if not connecting.done() or connecting.cancelled():
        raise StoppedBeforeReady
    nc = connecting.result()
    push_bounded(exits, functools.partial(close_nats, nc), "the NATS connection",
                 within_s=CLOSE_WITHIN_S + 2)  # fmt: skip
    return link


def open_database(
    exits: contextlib.AsyncExitStack, settings: Settings, *, application_name: str
) -> AsyncEngine:
    """The process's PostgreSQL pool, disposed by `exits`. It connects on first use; a
    connection lost to a restart is noticed and replaced when next lent (`pool_pre_ping`)."""
    from kiln.db.session import create_engine

    engine = create_engine(settings, application_name=application_name)
    push_bounded(exits, engine.dispose, "the database pool")
    return engine


def open_redis(exits: contextlib.AsyncExitStack, settings: Settings) -> Redis | None:
    """The process's Redis client (None without `KILN_REDIS_URL`), closed by `exits`. Its
    commands fail fast while Redis is away (callers fall back) and reconnect by themselves."""
    if not settings.redis_url:
        return None
    import redis.asyncio as aioredis

    client = aioredis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    push_bounded(exits, client.aclose, "the Redis client")
    return client


async def open_metrics(
    exits: contextlib.AsyncExitStack,
    settings: Settings,
    registries: Sequence[CollectorRegistry],
    *,
    health: Health | None = None,
) -> None:
    """Serve `registries` (and `health` at /healthz and /readyz) on `KILN_METRICS_PORT` until
    `exits` closes."""
    from kiln.observability.exposition import serve_metrics

    await exits.enter_async_context(
        serve_metrics(registries, host=settings.host, port=settings.metrics_port, health=health)
    )

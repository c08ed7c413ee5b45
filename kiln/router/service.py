"""A router on its own, as production runs it behind a load balancer (`python -m kiln.router`):
the HTTP API on `KILN_HOST:KILN_PORT`, with its metrics, `/healthz` and `/readyz` there too.
Any number of copies may run side by side; each connects to NATS, PostgreSQL and Redis.

SIGTERM or SIGINT stops it: `/readyz` fails at once (so the load balancer stops sending), the
server stops accepting connections, requests in flight finish within `KILN_SHUTDOWN_TIMEOUT`,
then the router's resources close in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from kiln._service import open_health, run_service
from kiln.errors import ServiceFailed
from kiln.router.app import create_app
from kiln.router.server import open_router
from kiln.settings import Settings

__all__ = ["main", "serve_router"]

_log = logging.getLogger("kiln.router")


async def serve_router(settings: Settings, stop: asyncio.Event) -> None:
    async with contextlib.AsyncExitStack() as exits:
        health = await open_health(exits, settings)
        health.readiness.append(lambda: "stopping" if stop.is_set() else None)
        server = await open_router(exits, settings, create_app(settings, health=health))
        _log.info("router serving on http://%s:%d", settings.host, settings.port)
        assert server.task is not None
        stopping = asyncio.create_task(stop.wait(), name="kiln-router-stop")
        await asyncio.wait({server.task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not stop.is_set():  # the server ended by itself: a failure, for the supervisor
            raise ServiceFailed("the router's HTTP server stopped by itself")
    _log.info("router stopped")


def main() -> None:
    run_service(serve_router)

"""The router's HTTP server (uvicorn) as one resource of a process's exit stack, for `python -m
kiln.router` and `kiln dev` alike.

Opening it runs the application's lifespan (NATS, PostgreSQL, Redis) and binds the port, and
returns once it serves, or raises what went wrong. Closing it is uvicorn's phased shutdown: stop
accepting connections, let requests in flight finish within `KILN_SHUTDOWN_TIMEOUT`, then the
lifespan closes what it opened; past a further margin the server is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator

import uvicorn
from starlette.applications import Starlette

from kiln._tasks import cancel_and_wait
from kiln.errors import KilnError, ServiceFailed
from kiln.settings import Settings

__all__ = ["RouterServer", "open_router"]

_log = logging.getLogger("kiln.router")
# Beyond the drain: the lifespan's own closing (each step of which is bounded).
_CLOSE_MARGIN_S = 8.0


class RouterServer(uvicorn.Server):
    """uvicorn without its own signal handling (the process owns signals and shutdown), and
    with an event for "serving"."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.serving = asyncio.Event()
        self.task: asyncio.Task[None] | None = None  # serving; done if it stopped by itself

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        except SystemExit:  # uvicorn's answer to a failed lifespan: not for this process
            self.should_exit = True
            return
        if not self.should_exit:
            self.serving.set()


async def open_router(
    exits: contextlib.AsyncExitStack, settings: Settings, app: Starlette
) -> RouterServer:
    """Serve `app` on `KILN_HOST:KILN_PORT` until `exits` closes."""
    server = RouterServer(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        )
    )
    running = server.task = asyncio.create_task(server.serve(), name="kiln-router")
    serving = asyncio.create_task(server.serving.wait(), name="kiln-router-serving")
    await asyncio.wait({running, serving}, return_when=asyncio.FIRST_COMPLETED)
    if not server.serving.is_set():
        await cancel_and_wait(serving)
        await running  # raises what went wrong, if it raised
        failure = getattr(app.state, "startup_error", None)
        if isinstance(failure, KilnError):
            raise failure
        raise ServiceFailed(
            f"the router could not start on {settings.host}:{settings.port}"
            + (f": {type(failure).__name__}: {failure}" if failure is not None else "")
        )

    async def stop() -> None:
        server.should_exit = True
        bound = settings.shutdown_timeout_s + _CLOSE_MARGIN_S
        done, _ = await asyncio.wait({running}, timeout=bound)
        if not done:
            _log.error("the router did not stop within %g s; cancelling it", bound)
            await cancel_and_wait(running)
        elif not running.cancelled() and running.exception() is not None:
            _log.error("the router failed while stopping: %r", running.exception())

    exits.push_async_callback(stop)
    return server

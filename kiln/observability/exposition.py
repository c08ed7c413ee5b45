"""Serving Prometheus metrics from processes that have no HTTP server of their own (the
scheduler, node agent and billing services): the registries of the parts a process runs, on
`KILN_METRICS_PORT`. The router renders its registries at its own `/metrics` instead."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Sequence

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric

from kiln.errors import ConfigError

__all__ = ["serve_metrics"]

_log = logging.getLogger("kiln.metrics")


class _Joined:
    """Several registries exposed as one; each keeps its own names, so none may repeat another's
    metric families (the parts of one process never do)."""

    def __init__(self, registries: Sequence[CollectorRegistry]) -> None:
        self.registries = tuple(registries)

    def collect(self) -> Iterable[Metric]:
        for registry in self.registries:
            yield from registry.collect()


@contextlib.asynccontextmanager
async def serve_metrics(
    registries: Sequence[CollectorRegistry], *, host: str, port: int
) -> AsyncIterator[None]:
    """Serve `registries` over HTTP on `host:port` (any path answers, `/metrics` included)
    while inside; the server is closed on the way out."""
    try:
        server, thread = start_http_server(port, addr=host, registry=_Joined(registries))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            [f"KILN_METRICS_PORT={port} cannot be served on {host}: {reason}; choose a free port"]
        ) from exc
    _log.info("metrics on http://%s:%d/metrics", host, port)
    try:
        yield
    finally:
        # shutdown() waits for serve_forever's next poll (up to half a second): not on the loop.
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        await asyncio.to_thread(thread.join, 5.0)

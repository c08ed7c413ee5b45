"""Serving Prometheus metrics and health from processes that have no HTTP server of their own
(the scheduler, node agent and billing services): the registries of the parts a process runs,
and `/healthz` and `/readyz` (kiln._health), on `KILN_METRICS_PORT`. The router renders its
registries and health at its own routes instead.

The server runs in a thread, so `/healthz` still answers (and says so) while the event loop is
stuck."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any
from wsgiref.simple_server import make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _get_best_family, _SilentHandler
from prometheus_client.metrics_core import Metric

from kiln._health import Health, Verdict
from kiln.errors import ConfigError

__all__ = ["serve_metrics"]

_log = logging.getLogger("kiln.metrics")


class _Joined:
    """Several registries exposed as one; each keeps its own names, so none may repeat another's
    metric families (the parts of one process never do)."""

    def __init__(self, registries: Sequence[CollectorRegistry]) -> None:
        # Not copied: a part made later (once NATS answers) adds its registry to the list.
        self.registries = registries

    def collect(self) -> Iterable[Metric]:
        for registry in self.registries:
            yield from registry.collect()


Wsgi = Callable[[dict[str, Any], Callable[..., Any]], list[bytes]]


def _with_health(metrics: Wsgi, health: Health) -> Wsgi:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO")
        verdict: Verdict
        if path == "/healthz":
            verdict, body = health.live(), ("ok", "unhealthy")
        elif path == "/readyz":
            verdict, body = health.ready(), ("ready", "not ready")
        else:
            return metrics(environ, start_response)
        status = "200 OK" if verdict.ok else "503 Service Unavailable"
        start_response(status, [("Content-Type", "application/json")])
        return [json.dumps(verdict.body(*body)).encode()]

    return app


@contextlib.asynccontextmanager
async def serve_metrics(
    registries: Sequence[CollectorRegistry],
    *,
    host: str,
    port: int,
    health: Health | None = None,
) -> AsyncIterator[None]:
    """Serve `registries` over HTTP on `host:port` (any path answers, `/metrics` included;
    with `health`, `/healthz` and `/readyz` answer for it) while inside; the server is closed
    on the way out."""
    app: Wsgi = make_wsgi_app(_Joined(registries))
    if health is not None:
        app = _with_health(app, health)

    class _Server(ThreadingWSGIServer):
        pass  # its own class: the address family is set on it

    try:
        _Server.address_family, addr = _get_best_family(host, port)  # type: ignore[no-untyped-call]
        server = make_server(addr, port, app, _Server, handler_class=_SilentHandler)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            [f"KILN_METRICS_PORT={port} cannot be served on {host}: {reason}; choose a free port"]
        ) from exc
    thread = threading.Thread(target=server.serve_forever, name="kiln-metrics", daemon=True)
    thread.start()
    _log.info("metrics on http://%s:%d/metrics", host, port)
    try:
        yield
    finally:
        # shutdown() waits for serve_forever's next poll (up to half a second): not on the loop.
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        await asyncio.to_thread(thread.join, 5.0)

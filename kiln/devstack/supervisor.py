"""`kiln dev` keeps its embedded servers running: one that exits (a crash, the OOM killer, a
`kill`) is started again on its data directory and ports, after a pause that doubles while it
keeps dying, and the event is logged and counted (`kiln_dev_service_restarts_total`). The
platform's processes reconnect by themselves (kiln._nats, the database pool, Redis).

It runs on `kiln dev`'s event loop, in the main thread: a server is started from there, since
its parent-death signal fires when the starting thread ends (kiln.devstack.process); waiting
for it to answer happens in a worker thread, so the loop keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter

from kiln.devstack.service import EmbeddedService
from kiln.errors import DevStackError

__all__ = ["Supervisor"]

_log = logging.getLogger("kiln.dev")
_CHECK_EVERY_S = 0.5
_FIRST_PAUSE_S = 0.5
_MAX_PAUSE_S = 30.0
# A server that has run this long since its last restart starts over with the shortest pause.
_STABLE_AFTER_S = 60.0


class Supervisor:
    def __init__(
        self,
        services: list[EmbeddedService],
        *,
        start_timeout_s: float = 60.0,
        on_restart: Callable[[], None] = lambda: None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`on_restart`: called after each restart (the stack records the new pids)."""
        self.services = services
        self.start_timeout_s = start_timeout_s
        self.on_restart = on_restart
        self.clock = clock
        self.registry = registry or CollectorRegistry()
        self.restarts = Counter(
            "kiln_dev_service_restarts",
            "Times `kiln dev` had an embedded server running again after it exited, by server.",
            ["service"],
            registry=self.registry,
        )
        for service in services:
            self.restarts.labels(service.name)
        self._pause: dict[str, float] = {}
        self._started_at: dict[str, float] = {s.name: clock() for s in services}

    async def run(self) -> None:
        """Watch the servers until cancelled."""
        while True:
            for service in self.services:
                process = service.process
                if process is not None and not process.running:
                    await self._restart(service, process.wait(0))
            await asyncio.sleep(_CHECK_EVERY_S)

    async def _restart(self, service: EmbeddedService, status: int | None) -> None:
        name = service.name
        if self.clock() - self._started_at[name] > _STABLE_AFTER_S:
            self._pause.pop(name, None)
        pause = self._pause.get(name, _FIRST_PAUSE_S)
        self._pause[name] = min(_MAX_PAUSE_S, pause * 2)
        _log.warning(
            "kiln dev: embedded %s exited (status %s); starting it again on %s in %.1f s",
            name, status, service.data_dir, pause,
        )  # fmt: skip
        await asyncio.sleep(pause)
        self._started_at[name] = self.clock()
        try:
            service.spawn()  # here, in the main thread (its parent-death signal)
            await asyncio.to_thread(service.wait_ready, self.start_timeout_s)
        except Exception as exc:  # noqa: BLE001 - the next check tries again, after a longer pause
            message = exc.message if isinstance(exc, DevStackError) else f"{exc!r}"
            _log.error("kiln dev: embedded %s did not come back: %s", name, message)
            return
        self.on_restart()
        self.restarts.labels(name).inc()
        _log.warning("kiln dev: embedded %s is back at %s", name, service.url)

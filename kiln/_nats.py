"""How a platform process connects to NATS: the one place that turns `Settings` into the
keywords of `nats.connect(...)`, so no process (or test) connects its own way.

Every connection reconnects forever. nats-py's defaults (60 attempts, 2 s apart, then closed
for good) let a process outlive a NATS outage of two minutes and no longer, after which it
served nothing while its health said ok. Here each attempt waits a jittered, doubling delay
capped at `RECONNECT_CAP_S`, so a restarted server is found again within about a second and a
fleet of clients does not knock on it in step. Pings every `PING_INTERVAL_S` notice a
half-open link (the peer vanished without a FIN) within three intervals.

`NatsLink` is one connection's state as the process's health, logs and metrics see it: since
when it is down, and callbacks for the parts that must act when it comes back (a replica asks
again for calls whose pull requests the server forgot).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from kiln.settings import Settings

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.client import Server

    from kiln.observability.nats import NatsMetrics, NatsProcess

__all__ = [
    "PING_INTERVAL_S",
    "RECONNECT_CAP_S",
    "NatsLink",
    "connect_options",
    "pick_server",
    "reconnect_delay",
]

_log = logging.getLogger("kiln.nats")

RECONNECT_CAP_S = 1.0
_RECONNECT_FIRST_S = 0.05
# nats-py declares the link stale when a third ping is due with two unanswered.
PING_INTERVAL_S = 10.0
_MAX_OUTSTANDING_PINGS = 2
DRAIN_TIMEOUT_S = 5.0

Callback = Callable[[], Awaitable[None] | None]


def reconnect_delay(attempt: int, *, rng: random.Random | None = None) -> float:
    """How long to wait before reconnect attempt `attempt` (0 for the first) to one server:
    half of a doubling delay plus a random part up to the other half, at most the cap."""
    ceiling = min(RECONNECT_CAP_S, _RECONNECT_FIRST_S * 2.0 ** min(attempt, 16))
    jitter: float = (rng or random).uniform(0, ceiling / 2)
    return ceiling / 2 + jitter


def pick_server(servers: list[Server], info: dict[str, Any]) -> tuple[Server | None, float]:
    """nats-py's `reconnect_to_server_handler`: the server tried least since it last answered
    (so a cluster's live members are tried before a dead one is tried again), and the delay
    its failures have earned."""
    if not servers:
        return None, RECONNECT_CAP_S
    chosen = min(servers, key=lambda server: server.reconnects)
    return chosen, reconnect_delay(chosen.reconnects)


def connect_options(settings: Settings, *, name: str | None = None) -> dict[str, Any]:
    """Keywords for `nats.connect(**connect_options(settings))`: the servers (a cluster's seed
    list), reconnecting forever with capped backoff, pings, and the process's credentials
    when `KILN_NATS_CREDS` is set."""
    options: dict[str, Any] = {
        "servers": settings.nats_servers,
        "connect_timeout": settings.connect_timeout_s,
        "max_reconnect_attempts": -1,
        # Between first-connect attempts (the handler below paces reconnects).
        "reconnect_time_wait": RECONNECT_CAP_S,
        "reconnect_to_server_handler": pick_server,
        "ping_interval": PING_INTERVAL_S,
        "max_outstanding_pings": _MAX_OUTSTANDING_PINGS,
        # drain() stops waiting for subscriptions to finish after this (nats-py: 30 s).
        "drain_timeout": DRAIN_TIMEOUT_S,
    }
    if name is not None:
        options["name"] = name
    if settings.nats_creds is not None:
        options["user_credentials"] = str(settings.nats_creds)
    return options


class NatsLink:
    """One NATS connection of this process and what it has been through.

    `await link.connect(settings)` opens it (waiting for NATS as long as it takes, saying so
    once); `down_for()` is how long it has been lost (0 while up), for health; parts register
    `on_reconnected` callbacks. With `metrics`, its state is also in `kiln_nats_connected` and
    `kiln_nats_reconnects_total` under `process`.
    """

    def __init__(
        self,
        name: str,
        *,
        metrics: NatsMetrics | None = None,
        process: NatsProcess | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.metrics = metrics
        self.process = process
        self.clock = clock
        self.nc: NATS | None = None
        self.servers = ""
        self._down_since: float | None = clock()  # until the first connect succeeds
        self._said_waiting = False
        self._reconnected: list[Callback] = []

    def on_reconnected(self, callback: Callback) -> None:
        """Run `callback` each time the connection comes back (not after the first connect)."""
        self._reconnected.append(callback)

    @property
    def client(self) -> NATS:
        if self.nc is None:
            raise RuntimeError(f"{self.name}: NATS is not connected yet")
        return self.nc

    @property
    def connected(self) -> bool:
        return self._down_since is None

    def down_for(self) -> float:
        """Seconds since the connection was lost (or since connecting began); 0 while up."""
        return 0.0 if self._down_since is None else self.clock() - self._down_since

    def options(self, settings: Settings, **extra: Any) -> dict[str, Any]:
        """`connect_options` with this link's callbacks; `extra` overrides or adds keywords."""
        callbacks: dict[str, Any] = {
            "disconnected_cb": self._disconnected,
            "reconnected_cb": self._back,
        }
        if self.metrics is not None and self.process is not None:
            callbacks = dict(
                self.metrics.callbacks(
                    self.process, disconnected=self._disconnected, reconnected=self._back
                )
            )
        self.servers = ", ".join(settings.nats_servers)
        return {
            **connect_options(settings, name=self.name),
            "error_cb": self._error,
            **callbacks,
            **extra,
        }

    async def connect(self, settings: Settings, **extra: Any) -> NATS:
        """Connect, retrying until NATS answers (a service waits for its dependency)."""
        import nats

        self.nc = await nats.connect(**self.options(settings, **extra))
        if self.metrics is not None and self.process is not None:
            self.metrics.up(self.process)
        self._up()
        return self.nc

    def _up(self) -> None:
        if self._down_since is not None and self._said_waiting:
            _log.warning(
                "%s: NATS is back (%s) after %.1f s", self.name, self.servers, self.down_for()
            )
        self._down_since = None
        self._said_waiting = False

    async def _disconnected(self) -> None:
        if self._down_since is None:
            self._down_since = self.clock()

    async def _back(self) -> None:
        if self._down_since is not None and not self._said_waiting:
            self._said_waiting = True  # a blip: say that it happened, once
        self._up()
        for callback in self._reconnected:
            try:
                result = callback()
                if result is not None:
                    await result
            except Exception:  # noqa: BLE001 - one part's trouble must not stop the others'
                _log.exception("%s: a reconnect callback failed", self.name)

    async def _error(self, exc: Exception) -> None:
        import nats.errors

        if self._down_since is None and isinstance(
            exc, (nats.errors.UnexpectedEOF, nats.errors.StaleConnectionError)
        ):
            # The link is going down (nats-py says so before `disconnected_cb`): the outage
            # starts here, and the "waiting" line below says it once. (Not any OSError: what
            # a message handler raised, a database's refused connection say, lands here too.)
            self._down_since = self.clock()
        if self._down_since is None:
            # Also what a message handler raised (nats-py reports those here).
            _log.warning(
                "%s: error in the NATS client or a message handler: %s: %s",
                self.name, type(exc).__name__, exc,
            )  # fmt: skip
        elif not self._said_waiting:
            self._said_waiting = True
            _log.warning(
                "%s: waiting for NATS at %s (%s); retrying every second or so until it answers",
                self.name, self.servers, str(exc) or type(exc).__name__,
            )  # fmt: skip

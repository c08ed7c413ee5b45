"""What /healthz and /readyz say (kiln._health), and how a NATS link waits and reconnects
(kiln._nats), with a fake clock."""

from __future__ import annotations

import random
from urllib.parse import urlparse

from nats.aio.client import Server

from kiln._health import Health
from kiln._nats import RECONNECT_CAP_S, NatsLink, connect_options, pick_server, reconnect_delay
from kiln.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def settings(**environ: str) -> Settings:
    return Settings.from_env({"HOME": "/tmp", **environ})


async def test_health_fails_once_nats_was_away_longer_than_the_setting() -> None:
    clock = Clock()
    health = Health(settings(KILN_HEALTH_NATS_DOWN_S="30"), clock=clock)
    link = NatsLink("kiln-router", clock=clock)
    health.watch(link)
    # Connecting counts as down: a process that never reached NATS is not healthy forever.
    assert health.live().ok
    assert health.ready().problems == ["kiln-router: NATS is not connected"]
    link._up()
    assert health.live().ok
    assert health.ready().ok
    await link._disconnected()
    clock.now += 29
    health._tick = clock.now
    assert health.live().ok
    assert not health.ready().ok
    clock.now += 2
    health._tick = clock.now
    verdict = health.live()
    assert verdict.problems == [
        "kiln-router: NATS unreachable for 31 s (KILN_HEALTH_NATS_DOWN_S=30)"
    ]
    assert verdict.body("ok", "unhealthy") == {"status": "unhealthy", "problems": verdict.problems}
    await link._back()
    assert health.live().ok
    assert health.ready().ok


def test_health_fails_when_the_event_loop_stalls_and_readiness_asks_the_parts() -> None:
    clock = Clock()
    health = Health(settings(KILN_HEALTH_LOOP_STALL_S="5"), clock=clock)
    stopping = False
    health.readiness.append(lambda: "stopping" if stopping else None)
    clock.now += 4.9
    assert health.live().ok
    clock.now += 0.2
    assert health.live().problems == [
        "the event loop has not run for 5.1 s (KILN_HEALTH_LOOP_STALL_S=5)"
    ]
    health._tick = clock.now
    assert health.ready().ok
    stopping = True
    assert health.ready().problems == ["stopping"]
    assert health.live().ok  # draining is healthy: no restart wanted


async def test_a_link_runs_its_reconnect_callbacks_and_counts_the_outage() -> None:
    clock = Clock()
    link = NatsLink("kiln-replica", clock=clock)
    link._up()
    back: list[str] = []
    link.on_reconnected(lambda: back.append("sync"))

    async def asynchronous() -> None:
        back.append("async")

    link.on_reconnected(asynchronous)
    await link._disconnected()
    clock.now += 3
    assert link.down_for() == 3
    await link._disconnected()  # a second notice does not restart the count
    clock.now += 1
    assert link.down_for() == 4
    await link._back()
    assert (link.connected, link.down_for(), back) == (True, 0.0, ["sync", "async"])


def test_reconnects_back_off_with_jitter_up_to_about_a_second() -> None:
    rng = random.Random(7)
    first = [reconnect_delay(0, rng=rng) for _ in range(100)]
    assert all(0.025 <= d <= 0.05 for d in first)
    assert len(set(first)) > 50  # jittered: clients do not knock in step
    late = [reconnect_delay(n, rng=rng) for n in range(6, 60)]
    assert all(RECONNECT_CAP_S / 2 <= d <= RECONNECT_CAP_S for d in late)


def test_the_server_tried_least_is_picked_with_the_delay_it_earned() -> None:
    dead = Server(uri=urlparse("nats://10.0.0.1:4222"), reconnects=3)
    fresh = Server(uri=urlparse("nats://10.0.0.2:4222"), reconnects=0)
    chosen, delay = pick_server([dead, fresh], {})
    assert chosen is fresh
    assert delay <= 0.05
    assert pick_server([], {}) == (None, RECONNECT_CAP_S)


def test_every_connection_reconnects_forever_with_pings_and_the_cluster_list() -> None:
    options = connect_options(
        settings(KILN_NATS_URL="nats://a:4222,nats://b:4222,nats://c:4222"), name="kiln-x"
    )
    assert options["servers"] == ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
    assert options["max_reconnect_attempts"] == -1
    assert options["reconnect_to_server_handler"] is pick_server
    # A half-open link is noticed within 30 s: nats-py gives up on the third unanswered ping.
    assert options["ping_interval"] * (options["max_outstanding_pings"] + 1) <= 30
    assert options["name"] == "kiln-x"

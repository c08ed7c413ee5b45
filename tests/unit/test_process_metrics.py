"""The metrics every process carries: NATS connection state and reconnects (fed by nats-py's
callbacks, whose own callbacks still run), the acting scheduler's replicas by state, and the
metrics server of the services (several registries on one port; a taken port is a setting to
fix, said so)."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from kiln.db.enums import ReplicaState
from kiln.errors import ConfigError
from kiln.observability.exposition import serve_metrics
from kiln.observability.nats import NatsMetrics, NatsProcess
from kiln.observability.scheduling import SchedulingMetrics


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_nats_callbacks_track_the_connection_and_chain_the_callers_own() -> None:
    metrics = NatsMetrics()
    heard: list[str] = []

    async def reconnected() -> None:
        heard.append("reconnected")

    callbacks = metrics.callbacks(NatsProcess.ROUTER, reconnected=reconnected)
    connected = ("kiln_nats_connected", {"process": "router"})
    assert sample(metrics.registry, connected[0], **connected[1]) == 0.0  # connecting
    metrics.up(NatsProcess.ROUTER)
    assert sample(metrics.registry, connected[0], **connected[1]) == 1.0
    assert sample(metrics.registry, "kiln_nats_reconnects_total", process="router") == 0.0

    await callbacks["disconnected_cb"]()
    assert sample(metrics.registry, connected[0], **connected[1]) == 0.0
    await callbacks["reconnected_cb"]()
    await callbacks["disconnected_cb"]()
    await callbacks["reconnected_cb"]()
    assert sample(metrics.registry, connected[0], **connected[1]) == 1.0
    assert sample(metrics.registry, "kiln_nats_reconnects_total", process="router") == 2.0
    assert heard == ["reconnected", "reconnected"]


async def test_two_connections_of_one_process_have_a_series_each() -> None:
    metrics = NatsMetrics()
    router = metrics.callbacks(NatsProcess.ROUTER)
    metrics.callbacks(NatsProcess.PLATFORM)
    metrics.up(NatsProcess.ROUTER)
    metrics.up(NatsProcess.PLATFORM)
    await router["disconnected_cb"]()
    assert sample(metrics.registry, "kiln_nats_connected", process="router") == 0.0
    assert sample(metrics.registry, "kiln_nats_connected", process="platform") == 1.0


def test_replicas_by_state_counts_every_live_state_and_zeroes_on_standby() -> None:
    registry = CollectorRegistry()
    metrics = SchedulingMetrics(registry)

    def by_state() -> dict[str, float | None]:
        states = ("starting", "restoring", "ready", "draining", "stopped")
        return {s: sample(registry, "kiln_scheduler_replicas_by_state", state=s) for s in states}

    assert by_state() == {
        "starting": 0.0, "restoring": 0.0, "ready": 0.0, "draining": 0.0, "stopped": None,
    }  # fmt: skip
    metrics.replica_states(
        [ReplicaState.READY, ReplicaState.READY, ReplicaState.STARTING, ReplicaState.STOPPED]
    )
    metrics.oldest_queued_job.set(42)
    assert by_state() == {
        "starting": 1.0, "restoring": 0.0, "ready": 2.0, "draining": 0.0, "stopped": None,
    }  # fmt: skip
    metrics.standing_by()
    assert set(by_state().values()) == {0.0, None}
    assert sample(registry, "kiln_jobs_oldest_queued_seconds") == 0.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_metrics_server_serves_several_registries_on_one_port_and_closes() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    Counter("kiln_test_first", "one part's", registry=first).inc(3)
    nats_metrics = NatsMetrics(second)
    nats_metrics.callbacks(NatsProcess.SCHEDULER)
    nats_metrics.up(NatsProcess.SCHEDULER)
    port = _free_port()
    async with (
        serve_metrics([first, second], host="127.0.0.1", port=port),
        httpx.AsyncClient() as client,
    ):
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    assert "kiln_test_first_total 3.0" in text
    assert 'kiln_nats_connected{process="scheduler"} 1.0' in text
    with socket.socket() as sock:  # nothing listens there any more (TIME_WAIT aside)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()


async def test_a_taken_metrics_port_names_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        with pytest.raises(ConfigError) as caught:
            async with serve_metrics([CollectorRegistry()], host="127.0.0.1", port=port):
                await asyncio.sleep(0)
    assert caught.value.message == (
        f"KILN_METRICS_PORT={port} cannot be served on 127.0.0.1: Address already in use; "
        "choose a free port"
    )

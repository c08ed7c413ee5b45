"""The platform's services as production runs them, each a process of its own (`python -m
kiln.scheduler`, `kiln.invoker`, `kiln.billing`): each serves its metrics on
`KILN_METRICS_PORT` and stops promptly on SIGTERM; a NATS outage shows in
`kiln_nats_connected` and `kiln_nats_reconnects_total`; and under `kiln dev` the scheduler's
replicas by state and the job queue's age are on the router's /metrics (issue 9)."""

from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from eventually import eventually
from stack import STOP_BOUND_S, Platform, Service, kill_nats, with_nats

from kiln.db import migrate
from kiln.db.enums import CallStatus
from kiln.db.models import App, Call, Function
from kiln.db.session import create_engine
from kiln.devstack.nats import EmbeddedNats
from kiln.devstack.ports import pick_port
from kiln.settings import Settings

pytestmark = pytest.mark.integration

NATS_METRICS = ['kiln_nats_connected{process="%s"} 1.0', 'kiln_nats_reconnects_total{process="%s"}']


@pytest.mark.parametrize(
    ("module", "process", "env", "names"),
    [
        (
            "kiln.scheduler", "scheduler", {},
            ['kiln_scheduler_leading 1.0', 'kiln_scheduler_replicas_by_state{state="ready"} 0.0',
             "kiln_jobs_oldest_queued_seconds 0.0", "kiln_cold_start_phase_seconds"],
        ),
        (
            "kiln.invoker", "node_agent",
            {"KILN_NODE_GPUS": "none:2", "KILN_STANDBY_PROCESSES": "0", "KILN_NODE_ID": "svc"},
            [],
        ),
        ("kiln.billing", "billing", {}, ["kiln_billing_ledger_lag_seconds"]),
    ],
)  # fmt: skip
async def test_each_service_serves_its_metrics_and_stops_on_sigterm(
    settings: Settings,
    tmp_path: Path,
    module: str,
    process: str,
    env: dict[str, str],
    names: list[str],
) -> None:
    await asyncio.to_thread(migrate.upgrade, settings)
    service = Service.start(module, settings, tmp_path, **env)
    try:
        text = await service.wait_for(*names, *(n % process for n in NATS_METRICS))
        assert f'kiln_nats_reconnects_total{{process="{process}"}} 0.0' in text
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.port}") as client:
            for path, good in (("/healthz", "ok"), ("/readyz", "ready")):
                answer = await client.get(path)
                assert (answer.status_code, answer.json()) == (
                    200, {"status": good, "problems": []}
                )  # fmt: skip
        if module == "kiln.invoker" and "kiln_gpu_" not in text:
            # The telemetry task opens NVML in a thread, which a loaded machine may not have
            # run yet: stopping before it says "no GPU" would leave the line below unwritten.
            await eventually(
                lambda: "no GPU telemetry on node svc" in service.log.read_text(),
                within_s=30, what="the node agent's word on GPU telemetry",
            )  # fmt: skip
        assert await service.stop() < STOP_BOUND_S
    finally:
        service.kill()
    log = service.log.read_text()
    assert "Traceback" not in log, log
    if module == "kiln.invoker" and "kiln_gpu_" not in text:
        # No GPU here: one line says so, and no GPU series are exported.
        assert log.count("no GPU telemetry on node svc") == 1, log


async def test_a_service_whose_metrics_port_is_taken_exits_with_status_2_and_says_why(
    settings: Settings, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = Service.start(
            "kiln.invoker", settings, tmp_path, KILN_METRICS_PORT=str(port),
            KILN_NODE_GPUS="none:1", KILN_STANDBY_PROCESSES="0", KILN_NODE_ID="svc-taken",
        )  # fmt: skip
        try:
            code = await asyncio.to_thread(service.process.wait, STOP_BOUND_S)
        finally:
            service.kill()
    log = service.log.read_text()
    assert code == 2, log
    assert f"error: KILN_METRICS_PORT={port} cannot be served on 127.0.0.1: " in log
    assert "Traceback" not in log


async def test_a_service_waiting_for_nats_says_why_it_is_not_ready_and_stops_at_once(
    settings: Settings, tmp_path: Path
) -> None:
    nowhere = settings.replace(nats_url=f"nats://127.0.0.1:{pick_port([], set())}")
    service = Service.start("kiln.scheduler", nowhere, tmp_path)
    try:
        text = await service.wait_for('kiln_nats_connected{process="scheduler"} 0.0')
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.port}") as client:
            ready = await client.get("/readyz")
            live = await client.get("/healthz")
        assert ready.status_code == 503
        assert ready.json()["problems"] == ["kiln-scheduler: NATS is not connected"]
        assert live.status_code == 200  # not yet KILN_HEALTH_NATS_DOWN_S
        assert "kiln_scheduler_leading" not in text
        assert await service.stop() < 5  # it was only waiting
    finally:
        service.kill()
    log = service.log.read_text()
    assert log.count("waiting for NATS at") == 1, log
    assert "Traceback" not in log, log


async def test_a_nats_outage_shows_in_connected_and_is_counted_as_a_reconnect(
    settings: Settings, own_nats: EmbeddedNats, tmp_path: Path
) -> None:
    service = Service.start(
        "kiln.invoker", with_nats(settings, own_nats), tmp_path,
        KILN_NODE_GPUS="none:1", KILN_STANDBY_PROCESSES="0", KILN_NODE_ID="svc-outage",
    )  # fmt: skip
    try:
        await service.wait_for('kiln_nats_connected{process="node_agent"} 1.0')
        await asyncio.to_thread(kill_nats, own_nats)
        await service.wait_for('kiln_nats_connected{process="node_agent"} 0.0', within_s=15)
        own_nats.start(30)  # from the main thread (its parent-death signal); brief
        await service.wait_for(
            'kiln_nats_connected{process="node_agent"} 1.0',
            'kiln_nats_reconnects_total{process="node_agent"} 1.0',
            within_s=30,
        )
        assert await service.stop() < STOP_BOUND_S
    finally:
        service.kill()


PING = """
import kiln

app = kiln.App("bystate")


@app.function()
def ping() -> str:
    return "pong"
"""


async def test_the_platform_metrics_show_replicas_by_state_and_the_oldest_queued_job(
    platform: Platform, tmp_path: Path
) -> None:
    await platform.deploy_source(tmp_path, "bystate.py", PING)
    assert (await platform.call("bystate/ping")).status_code == 200

    async def metrics_with(wanted: str) -> str:
        async def holds() -> str:
            async with platform.client() as client:
                text = (await client.get("/metrics")).text
            assert wanted in text, f"no {wanted!r} in\n{text}"
            return text

        return await eventually(holds, within_s=15)

    text = await metrics_with('kiln_scheduler_replicas_by_state{state="ready"} 1.0')
    # The router's connection and the platform's share one registry: each family once.
    assert text.count("# HELP kiln_nats_connected ") == 1
    assert 'kiln_nats_connected{process="router"} 1.0' in text
    assert 'kiln_nats_connected{process="platform"} 1.0' in text

    # A job queued two minutes ago (no replica will take it: it is in no queue).
    engine = create_engine(platform.settings, application_name="kiln-test")
    call_id = uuid.uuid4()
    try:
        async with engine.begin() as conn:
            function_id, customer_id = (
                await conn.execute(
                    sa.select(Function.id, App.customer_id)
                    .join(App, Function.app_id == App.id)
                    .where(App.name == "bystate", Function.name == "ping")
                )
            ).one()
            await conn.execute(
                sa.insert(Call).values(
                    id=call_id, customer_id=customer_id, function_id=function_id,
                    status=CallStatus.QUEUED, request_digest="0" * 64,
                    created_at=sa.func.now() - sa.text("interval '120 seconds'"),
                )
            )  # fmt: skip
        text = await metrics_with("\nkiln_jobs_oldest_queued_seconds 12")
        age = float(text.split("\nkiln_jobs_oldest_queued_seconds ")[1].split()[0])
        assert 120 <= age < 150
    finally:
        async with engine.begin() as conn:
            await conn.execute(sa.delete(Call).where(Call.id == call_id))
        await engine.dispose()
    await metrics_with("\nkiln_jobs_oldest_queued_seconds 0.0")

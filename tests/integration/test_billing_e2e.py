"""Usage metering on the real stack (issue 8, first part): a replica reports its time every few
seconds and when it stops, the billing worker writes each report once into `usage_events` and
the ledger at the GPU type's price, and a report delivered again is not charged again."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import nats
import pytest
import sqlalchemy as sa
from eventually import eventually
from sqlalchemy.ext.asyncio import AsyncEngine
from stack import ExtraNode, Platform, extra_node

from kiln._nats import connect_options
from kiln.billing.prices import cost_micros
from kiln.db.enums import LedgerKind
from kiln.db.models import Customer, LedgerEntry, UsageEvent
from kiln.db.session import create_engine
from kiln.functions.package import package
from kiln.metering import USAGE_INTERVAL_S, USAGE_MAC, publish_usage, usage_mac
from kiln.wire import Subjects, UsageReport, encode

pytestmark = pytest.mark.integration

APP = """
import kiln

app = kiln.App("metered")


@app.function(idle_timeout=6)
def work() -> str:
    return "done"
"""


async def usage_events(engine: AsyncEngine, customer_id: uuid.UUID) -> list[Any]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(UsageEvent)
            .where(UsageEvent.customer_id == customer_id)
            .order_by(UsageEvent.period_start)
        )
        return list(rows.all())


async def closed_by(engine: AsyncEngine, customer_id: uuid.UUID, moment: float) -> list[Any]:
    """The customer's usage events once they reach `moment` (a time.time())."""
    events = await usage_events(engine, customer_id)
    assert events, "no usage"
    assert events[-1].period_end.timestamp() >= moment, events
    return events


async def live_replicas(platform: Platform, key: str) -> list[object]:
    async with platform.client() as c:
        c.headers["Authorization"] = f"Bearer {key}"
        replicas: list[object] = (await c.get("/v1/functions/metered/work/replicas")).json()[
            "replicas"
        ]
    return replicas


async def test_a_replicas_time_is_reported_and_charged_once(
    platform: Platform, tmp_path: Path
) -> None:
    async with platform.client() as operator:
        customer = (
            await operator.post("/v1/customers", json={"name": "Meter", "tier": "enterprise"})
        ).json()
        key = (
            await operator.post("/v1/keys", json={"kind": "account", "customer_id": customer["id"]})
        ).json()["key"]
    app_file = tmp_path / "metered.py"
    app_file.write_text(APP)
    async with platform.client() as c:
        c.headers["Authorization"] = f"Bearer {key}"
        assert (await c.post("/v1/apps", json=package(app_file).deploy_body())).is_success
        assert (await c.post("/v1/run/metered/work")).json() == "done"
    customer_id = uuid.UUID(customer["id"])
    engine = create_engine(platform.settings, application_name="kiln-test")
    try:
        # Reports every 5 s, and a last one when the idle replica stops (after 6 s idle): the
        # one cut short, at the moment the process exited.

        async def stopped() -> list[Any]:
            events = await usage_events(engine, customer_id)
            assert len(events) >= 2, events
            assert not await live_replicas(platform, key)
            assert events[-1].duration_ms < USAGE_INTERVAL_S * 1000, "no last report yet"
            return events

        events = await eventually(stopped, within_s=40)
        assert len({e.replica_id for e in events}) == 1
        # One interval after the other: no second lost, none counted twice.
        for earlier, later in itertools.pairwise(events):
            assert later.period_start == earlier.period_end
        lifetime_ms = (events[-1].period_end - events[0].period_start).total_seconds() * 1000
        assert abs(sum(e.duration_ms for e in events) - lifetime_ms) <= len(events)
        assert lifetime_ms > 6000  # it lived through its idle timeout

        # Each report is one ledger entry at the CPU slot's price, plus the enterprise plan's
        # $0.01 for each call the interval took; the balance follows (with the plan's monthly
        # fee, once the billing service has charged it).
        prices = platform.settings.gpu_prices
        expected = [
            -cost_micros(prices, "none", e.gpu_count, e.duration_ms) - 10_000 * e.calls
            for e in events
        ]
        assert sum(e.calls for e in events) == 1
        async with engine.connect() as conn:
            entries = (
                await conn.execute(
                    sa.select(LedgerEntry.amount_micros, LedgerEntry.usage_event_id)
                    .where(
                        LedgerEntry.customer_id == customer_id,
                        LedgerEntry.kind == LedgerKind.USAGE,
                    )
                    .order_by(LedgerEntry.id)
                )
            ).all()
            every = (
                sa.select(sa.func.sum(LedgerEntry.amount_micros))
                .where(LedgerEntry.customer_id == customer_id)
                .scalar_subquery()
            )
            balance, every = (  # one statement: one snapshot, whatever the billing does
                await conn.execute(
                    sa.select(Customer.balance_micros, every).where(Customer.id == customer_id)
                )
            ).one()
        assert sorted(a for a, _ in entries) == sorted(expected)
        assert {event_id for _, event_id in entries} == {e.id for e in events}
        assert balance == every <= sum(expected) < 0

        # The same report delivered again (a new message, signed, the same event id) is not
        # charged; a new report sent after it (the marker) is: once it is, the replay was read.
        first, secret = events[0], str(platform.settings.snapshot_signing_key)
        again = UsageReport(
            event_id=first.id, replica_id=str(first.replica_id), customer_id=str(customer_id),
            function_id=str(first.function_id), gpu_type="none", gpu_count=first.gpu_count,
            period_start=first.period_start.timestamp(), period_end=first.period_end.timestamp(),
        )  # fmt: skip
        marker = replace(again, event_id=f"{uuid.uuid4()}:1", replica_id=str(uuid.uuid4()))
        nc = await nats.connect(**connect_options(platform.settings))
        try:
            subjects = Subjects(platform.settings.namespace)
            body = encode(again)
            replay = {"Nats-Msg-Id": f"replay-{uuid.uuid4()}", USAGE_MAC: usage_mac(secret, body)}
            await nc.jetstream().publish(subjects.usage(first.replica_id), body, headers=replay)
            await publish_usage(nc, subjects, marker, secret=secret)
        finally:
            await nc.close()

        async def marker_charged() -> bool:
            return marker.event_id in {e.id for e in await usage_events(engine, customer_id)}

        await eventually(marker_charged, within_s=10)
        async with engine.connect() as conn:
            count = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(LedgerEntry)
                .where(LedgerEntry.customer_id == customer_id, LedgerEntry.kind == LedgerKind.USAGE)
                .where(LedgerEntry.usage_event_id != marker.event_id)
            )
        assert count == len(events)
    finally:
        await engine.dispose()


GPU_APP = """
import kiln

app = kiln.App("NAME")


@app.function(gpu="H100", idle_timeout=300)
def work() -> str:
    return "done"
"""


@contextlib.asynccontextmanager
async def gpu_replica(
    platform: Platform, tmp_path: Path, name: str
) -> AsyncIterator[tuple[uuid.UUID, ExtraNode, Any]]:
    """A customer's app `name` with one replica on a node of its own (an H100 host), after one
    call: (customer id, the node, the node agent's record of the replica)."""
    async with platform.client() as operator:
        customer = (
            await operator.post("/v1/customers", json={"name": name, "tier": "enterprise"})
        ).json()
        key = (
            await operator.post("/v1/keys", json={"kind": "account", "customer_id": customer["id"]})
        ).json()["key"]
    app_file = tmp_path / f"{name}.py"
    app_file.write_text(GPU_APP.replace("NAME", name))
    async with extra_node(platform, tmp_path / name, f"{name}-node", {"H100": 1}) as node:
        async with platform.client() as c:
            c.headers["Authorization"] = f"Bearer {key}"
            assert (await c.post("/v1/apps", json=package(app_file).deploy_body())).is_success
            assert (await c.post(f"/v1/run/{name}/work")).json() == "done"
        (running,) = node.agent.replicas.values()
        yield uuid.UUID(customer["id"]), node, running


async def test_a_killed_replicas_time_is_closed_by_its_node_agent(
    platform: Platform, tmp_path: Path
) -> None:
    """No final report from a replica killed with SIGKILL: its node agent writes the intervals
    it never reported, up to the moment the process was gone. Billed time covers the whole
    life of the slot, and exceeds it by no more than the agent took to notice."""
    engine = create_engine(platform.settings, application_name="kiln-test")
    try:
        async with gpu_replica(platform, tmp_path, "killed") as (customer_id, _, running):
            since = running.launch.received_at
            # Past one report (at 5 s) and into the next interval, then killed.
            await asyncio.sleep(max(0.0, since + 7.5 - time.time()))
            os.killpg(running.process.pid, signal.SIGKILL)
            killed_at = time.time()
            events = await eventually(
                lambda: closed_by(engine, customer_id, killed_at), within_s=20
            )
        assert [e.id.rsplit(":", 1)[1] for e in events] == ["1", "2"]
        assert events[0].period_start.timestamp() == pytest.approx(since, abs=1e-3)
        for earlier, later in itertools.pairwise(events):
            assert later.period_start == earlier.period_end
        billed_s = sum(e.duration_ms for e in events) / 1000
        true_s = killed_at - since
        assert true_s <= billed_s + 0.002 <= true_s + 1.0
        assert {e.gpu_type for e in events} == {"H100"}
        assert events[0].calls == 1  # the one call, in the interval it was taken
    finally:
        await engine.dispose()


async def test_a_lost_hosts_replica_time_is_closed_by_the_scheduler_at_its_last_heartbeat(
    platform: Platform, tmp_path: Path
) -> None:
    """The host dies with its node agent: nobody sees the replica exit, so the scheduler, when
    it declares the node lost, writes the intervals the ledger lacks up to the node's last
    heartbeat (at most a heartbeat before the death)."""
    engine = create_engine(platform.settings, application_name="kiln-test")
    try:
        async with gpu_replica(platform, tmp_path, "lost") as (customer_id, node, running):
            since = running.launch.received_at
            await asyncio.sleep(max(0.0, since + 7.5 - time.time()))
            await node.kill()
            died_at = time.time()
        events = await eventually(
            lambda: closed_by(engine, customer_id, died_at - 2.0), within_s=30
        )
        assert [e.id.rsplit(":", 1)[1] for e in events] == ["1", "2"]
        for earlier, later in itertools.pairwise(events):
            assert later.period_start == earlier.period_end
        billed_s = sum(e.duration_ms for e in events) / 1000
        assert died_at - since - 2.0 <= billed_s <= died_at - since
    finally:
        await engine.dispose()


async def test_only_usage_the_platform_signed_is_charged(platform: Platform) -> None:
    """Usage reports carry a MAC from the platform's signing key, which replicas never hold:
    one without it (as a replica could get JetStream to publish) is refused, and one the
    platform signed, sent after it, is charged."""
    secret = platform.settings.snapshot_signing_key
    assert secret is not None
    async with platform.client() as operator:
        customer = (
            await operator.post("/v1/customers", json={"name": "Victim", "tier": "enterprise"})
        ).json()
    customer_id = uuid.UUID(customer["id"])

    def report(seconds: float) -> UsageReport:
        replica = str(uuid.uuid4())
        start = time.time() - seconds - 1
        return UsageReport(
            event_id=f"{replica}:1", replica_id=replica, customer_id=str(customer_id),
            function_id=str(uuid.uuid4()), gpu_type="none", gpu_count=1,
            period_start=start, period_end=start + seconds,
        )  # fmt: skip

    subjects = Subjects(platform.settings.namespace)
    nc = await nats.connect(**connect_options(platform.settings))
    engine = create_engine(platform.settings, application_name="kiln-test")
    try:
        forged, signed = report(3600), report(2)
        js = nc.jetstream()
        await js.publish(subjects.usage(uuid.UUID(forged.replica_id)), encode(forged))
        await publish_usage(nc, subjects, signed, secret=secret)
        events = await eventually(lambda: usage_events(engine, customer_id), within_s=20)
        assert [e.id for e in events] == [signed.event_id]
    finally:
        await engine.dispose()
        await nc.close()

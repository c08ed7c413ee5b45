"""Usage metering on the real stack (issue 8, first part): a replica reports its time every few
seconds and when it stops, the billing worker writes each report once into `usage_events` and
the ledger at the GPU type's price, and a report delivered again is not charged again."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from pathlib import Path
from typing import Any

import nats
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from stack import Platform, platform_fixture  # noqa: F401 - the fixture

from kiln.billing.prices import cost_micros
from kiln.db.enums import LedgerKind
from kiln.db.models import Customer, LedgerEntry, UsageEvent
from kiln.db.session import create_engine
from kiln.functions.package import package
from kiln.wire import Subjects

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
        # Reports every 5 s, and a last one when the idle replica stops (after 6 s idle).
        deadline = time.monotonic() + 40
        while True:
            events = await usage_events(engine, customer_id)
            replica_ids = {e.replica_id for e in events}
            if len(events) >= 2 and not await live_replicas(platform, key):
                await asyncio.sleep(1.5)  # the last report, sent as the replica stopped
                events = await usage_events(engine, customer_id)
                break
            assert time.monotonic() < deadline, events
            await asyncio.sleep(0.5)
        assert len(replica_ids) == 1
        # One interval after the other: no second lost, none counted twice.
        for earlier, later in itertools.pairwise(events):
            assert later.period_start == earlier.period_end
        lifetime_ms = (events[-1].period_end - events[0].period_start).total_seconds() * 1000
        assert abs(sum(e.duration_ms for e in events) - lifetime_ms) <= len(events)
        assert lifetime_ms > 6000  # it lived through its idle timeout

        # Each report is one ledger entry at the CPU slot's price; the balance follows.
        prices = platform.settings.gpu_prices
        expected = [-cost_micros(prices, "none", e.gpu_count, e.duration_ms) for e in events]
        async with engine.connect() as conn:
            entries = (
                await conn.execute(
                    sa.select(LedgerEntry.amount_micros, LedgerEntry.usage_event_id)
                    .where(LedgerEntry.customer_id == customer_id)
                    .order_by(LedgerEntry.id)
                )
            ).all()
            balance = await conn.scalar(
                sa.select(Customer.balance_micros).where(Customer.id == customer_id)
            )
        assert sorted(a for a, _ in entries) == sorted(expected)
        assert {event_id for _, event_id in entries} == {e.id for e in events}
        assert balance == sum(expected) < 0

        # The same report delivered again (a new message, the same event id) is not charged.
        first = events[0]
        again = {
            "event_id": first.id, "replica_id": str(first.replica_id),
            "customer_id": str(customer_id), "function_id": str(first.function_id),
            "gpu_type": "none", "gpu_count": first.gpu_count,
            "period_start": first.period_start.timestamp(),
            "period_end": first.period_end.timestamp(), "final": False,
        }  # fmt: skip
        nc = await nats.connect(servers=platform.settings.nats_servers)
        try:
            subjects = Subjects(platform.settings.namespace)
            await nc.jetstream().publish(
                subjects.usage(first.replica_id),
                json.dumps(again).encode(),
                headers={"Nats-Msg-Id": f"replay-{uuid.uuid4()}"},
            )
        finally:
            await nc.close()
        await asyncio.sleep(2.0)  # the worker fetches every second
        async with engine.connect() as conn:
            count = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(LedgerEntry)
                .where(LedgerEntry.customer_id == customer_id, LedgerEntry.kind == LedgerKind.USAGE)
            )
        assert count == len(events)
    finally:
        await engine.dispose()

"""Plans (issue 25, first part) on a real PostgreSQL: the brief's three tiers as default plans,
plans created and changed over HTTP with their refusals, monthly fees charged once per period,
a plan change midway through a month prorated to the micro-unit, per-request prices with
included requests, and the brief's worked example: an enterprise month of 36,450 requests
costs $2,500 + $364.50 = $2,864.50."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from stack import Platform
from typer.testing import CliRunner, Result

from kiln.billing.ledger import Changes, billing_rules
from kiln.billing.plans import change_plan, charge_due_fees, charge_period_fee, period_of
from kiln.billing.worker import BillingWorker
from kiln.cli.main import app as cli
from kiln.db.enums import CustomerTier, LedgerKind
from kiln.db.models import Customer, LedgerEntry, Plan
from kiln.db.session import session_factory, transaction
from kiln.wire import UsageReport

pytestmark = [pytest.mark.integration]

USD = 1_000_000
MARCH = datetime(2026, 3, 1, tzinfo=UTC)


class _NoNats:
    """The NATS connection of a worker that only records (block announcements go nowhere)."""

    def jetstream(self) -> None:
        return None


def worker(platform: Platform, engine: AsyncEngine) -> BillingWorker:
    return BillingWorker(
        _NoNats(),  # type: ignore[arg-type]
        session_factory(engine),
        platform.settings.namespace,
        billing_rules(platform.settings),
        stream_replicas=1,
    )


async def customer_on(engine: AsyncEngine, plan: str, since: datetime) -> uuid.UUID:
    """A customer on `plan` since `since` (as if created then)."""
    async with transaction(session_factory(engine)) as session:
        tier = (await session.get_one(Plan, plan)).tier
        customer = Customer(name=f"on {plan}", tier=tier, plan=plan, plan_since=since,
                            created_at=since)  # fmt: skip
        session.add(customer)
        await session.flush()
        return customer.id


async def entries(engine: AsyncEngine, customer_id: uuid.UUID) -> list[tuple[LedgerKind, int]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(LedgerEntry.kind, LedgerEntry.amount_micros)
            .where(LedgerEntry.customer_id == customer_id)
            .order_by(LedgerEntry.id)
        )
        return [(LedgerKind(kind), amount) for kind, amount in rows]


async def balance(engine: AsyncEngine, customer_id: uuid.UUID) -> int:
    async with engine.connect() as conn:
        found = await conn.scalar(
            sa.select(Customer.balance_micros).where(Customer.id == customer_id)
        )
    assert found is not None
    return int(found)


def calls(customer_id: uuid.UUID, start: datetime, count: int) -> UsageReport:
    """An interval of a CPU replica's time that took `count` calls (and no time to speak of)."""
    replica = str(uuid.uuid4())
    return UsageReport(
        event_id=f"{replica}:1", replica_id=replica, customer_id=str(customer_id),
        function_id=str(uuid.uuid4()), gpu_type="none", gpu_count=1,
        period_start=start.timestamp(), period_end=start.timestamp(), calls=count,
    )  # fmt: skip


async def test_the_tiers_are_the_default_plans(platform: Platform) -> None:
    async with platform.client() as client:
        plans = {p["name"]: p for p in (await client.get("/v1/plans")).json()["plans"]}
    prices = {
        name: (p["monthly_fee_micros"], p["request_price_micros"]) for name, p in plans.items()
    }
    assert prices["free"] == (0, 0)
    assert prices["pro"] == (500 * USD, 0)
    assert prices["enterprise"] == (2_500 * USD, 10_000)
    assert plans["enterprise"]["limits"]["prepaid"] is False
    assert plans["pro"]["limits"]["per_minute"] == 100


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({"name": "cheap", "monthly_fee_micros": -1}, 400, "monthly_fee_micros",
         "whole micro-units from 0"),
        ({"name": "Bad Name"}, 400, "name", "lowercase letters, digits"),
        ({"name": "gpu", "gpu_prices": {"Z100": 5}}, 400, "gpu_prices",
         "gpu_prices names 'Z100': the GPU types are"),
        ({"name": "pro"}, 409, "plan 'pro'", "plan 'pro' exists already"),
        ({"name": "x", "tier": "platinum"}, 400, "tier", "one of free, pro, enterprise"),
    ],
)  # fmt: skip
async def test_bad_plans_are_refused_by_name(
    platform: Platform, body: dict[str, Any], status: int, param: str, words: str
) -> None:
    async with platform.client() as client:
        answer = await client.post("/v1/plans", json=body)
    assert answer.status_code == status, answer.text
    message = answer.json()["error"]["message"]
    assert message.startswith(param)  # Kiln's errors name the field first
    assert words in message


async def test_plans_are_made_and_changed_by_operators_and_customers_move_between_them(
    platform: Platform, engine: AsyncEngine
) -> None:
    async with platform.client() as client:
        made = await client.post("/v1/plans", json={
            "name": "startup", "title": "Startup", "tier": "pro", "monthly_fee_micros": 0,
            "request_price_micros": 500, "included_requests": 1000, "gpu_prices": {"H100": 3 * USD},
        })  # fmt: skip
        assert made.status_code == 201, made.text
        changed = await client.patch("/v1/plans/startup", json={"monthly_fee_micros": 99 * USD})
        assert changed.json()["monthly_fee_micros"] == 99 * USD
        assert changed.json()["gpu_prices"] == {"H100": 3 * USD}
        customer = (
            await client.post("/v1/customers", json={"name": "S", "plan": "startup"})
        ).json()
        assert (customer["plan"], customer["tier"]) == ("startup", "pro")
        unknown = await client.patch(f"/v1/customers/{customer['id']}", json={"plan": "gold"})
        both = await client.patch(
            f"/v1/customers/{customer['id']}", json={"plan": "pro", "tier": "pro"}
        )
        moved = await client.patch(f"/v1/customers/{customer['id']}", json={"plan": "enterprise"})
        listed = {p["name"]: p for p in (await client.get("/v1/plans")).json()["plans"]}
        key = await client.post("/v1/keys", json={"kind": "account", "customer_id": customer["id"]})
        client.headers["Authorization"] = f"Bearer {key.json()['key']}"
        denied = await client.post("/v1/plans", json={"name": "mine"})
        seen = await client.get("/v1/plans")
    assert unknown.status_code == 404
    assert "plan 'gold' not found; the plans are" in unknown.json()["error"]["message"]
    assert both.status_code == 400
    assert (moved.json()["plan"], moved.json()["tier"]) == ("enterprise", "enterprise")
    assert listed["startup"]["customers"] == 0
    assert denied.status_code == 403
    assert seen.status_code == 200  # customers see the plans they may choose from
    kinds = [kind for kind, _ in await entries(engine, uuid.UUID(customer["id"]))]
    # Its fee for the rest of the month when it came, then the move: the unused part of that
    # fee back and enterprise's for the rest of the month.
    assert kinds == [LedgerKind.FEE, LedgerKind.PRORATION, LedgerKind.PRORATION]


async def test_a_plan_change_midway_through_a_month_is_prorated_to_the_micro_unit(
    platform: Platform, engine: AsyncEngine
) -> None:
    customer_id = await customer_on(engine, "pro", MARCH)
    rules = billing_rules(platform.settings)
    midway = datetime(2026, 3, 16, tzinfo=UTC)  # 15 of March's 31 days on pro, 16 on enterprise
    async with transaction(session_factory(engine)) as session:
        await change_plan(session, customer_id, "enterprise", midway, rules, Changes())
    month = 31 * 86_400
    rest = 16 * 86_400
    back = 500 * USD * rest // month
    due = 2_500 * USD * rest // month
    assert await entries(engine, customer_id) == [
        (LedgerKind.FEE, -500 * USD), (LedgerKind.PRORATION, back), (LedgerKind.PRORATION, -due),
    ]  # fmt: skip
    # The month costs each plan's fee for its days, to within a micro-unit of rounding.
    expected = 500 * USD * 15 / 31 + 2_500 * USD * 16 / 31
    assert abs(-await balance(engine, customer_id) - expected) <= 1
    # The period's fee is charged once however often it is asked for; the next month's is the
    # new plan's, whole.
    async with transaction(session_factory(engine)) as session:
        customer = await session.get_one(Customer, customer_id, with_for_update=True)
        again = await charge_period_fee(session, customer, period_of(midway), rules, Changes())
        april = datetime(2026, 4, 2, tzinfo=UTC)
        charged = await charge_period_fee(session, customer, period_of(april), rules, Changes())
    assert (again, charged) == (False, True)
    assert (await entries(engine, customer_id))[-1] == (LedgerKind.FEE, -2_500 * USD)


async def test_the_briefs_enterprise_month_costs_2864_dollars_50(
    platform: Platform, engine: AsyncEngine
) -> None:
    customer_id = await customer_on(engine, "enterprise", MARCH)
    rules = billing_rules(platform.settings)
    async with transaction(session_factory(engine)) as session:
        customer = await session.get_one(Customer, customer_id, with_for_update=True)
        await charge_period_fee(session, customer, period_of(MARCH), rules, Changes())
    reports = [calls(customer_id, MARCH.replace(day=1 + i % 28), 1215) for i in range(30)]
    assert sum(r.calls for r in reports) == 36_450
    assert await worker(platform, engine).record(reports) == 30
    assert -await balance(engine, customer_id) == 2_864_500_000  # $2,500 + 36,450 x $0.01


async def test_included_requests_are_free_and_the_rest_pay_the_plans_price(
    platform: Platform, engine: AsyncEngine
) -> None:
    async with transaction(session_factory(engine)) as session:
        session.add(Plan(name="bundle", tier=CustomerTier.PRO, request_price_micros=1_000,
                         included_requests=100))  # fmt: skip
    customer_id = await customer_on(engine, "bundle", MARCH)
    recorder = worker(platform, engine)
    await recorder.record([calls(customer_id, MARCH, 60)])
    assert await balance(engine, customer_id) == 0  # 60 of 100 included
    await recorder.record([calls(customer_id, MARCH, 60)])
    assert await balance(engine, customer_id) == -20 * 1_000  # 20 past the included 100
    await recorder.record([calls(customer_id, datetime(2026, 4, 1, tzinfo=UTC), 60)])
    assert await balance(engine, customer_id) == -20 * 1_000  # April has its own 100


async def test_the_sweep_charges_each_paying_customer_once_per_period(
    platform: Platform, engine: AsyncEngine
) -> None:
    paying = await customer_on(engine, "pro", MARCH)
    free = await customer_on(engine, "free", MARCH)
    rules = billing_rules(platform.settings)
    may = datetime(2026, 5, 3, tzinfo=UTC)
    for _ in range(2):
        async with transaction(session_factory(engine)) as session:
            await charge_due_fees(session, may, rules, Changes())
    assert await entries(engine, paying) == [(LedgerKind.FEE, -500 * USD)]
    assert await entries(engine, free) == []


async def test_the_cli_lists_creates_and_updates_plans(platform: Platform, tmp_path: Path) -> None:
    env = {"KILN_URL": platform.url, "KILN_API_KEY": platform.key, "KILN_HOME": str(tmp_path)}

    def kiln(*args: str) -> Result:
        return CliRunner().invoke(cli, list(args), env=env)

    made = await asyncio.to_thread(
        kiln, "plans", "create", "scale", "--tier", "pro", "--fee", "99.5", "--per-request",
        "0.002", "--included", "5000", "--gpu-price", "H100=3.25",
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    assert made.output.split()[:4] == ["scale", "pro", "99.50/month", "0.00/request"]
    assert "H100 3.25/h" in made.output
    updated = await asyncio.to_thread(kiln, "plans", "update", "scale", "--fee", "120")
    assert "120.00/month" in updated.output
    listed = await asyncio.to_thread(kiln, "plans", "list", "--json")
    scale = next(p for p in json.loads(listed.output) if p["name"] == "scale")
    assert (scale["monthly_fee_micros"], scale["request_price_micros"]) == (120 * USD, 2_000)
    assert scale["included_requests"] == 5000
    bad = await asyncio.to_thread(kiln, "plans", "create", "odd", "--gpu-price", "H100")
    assert bad.exit_code != 0
    said = " ".join(re.sub(r"[\u2500-\u257f]", " ", bad.output).split())  # no box, no wraps
    assert "write GPU=USD_PER_HOUR, such as H100=3.5" in said

"""Balances and payments against a fake Stripe on the real stack (issue 8): verified webhooks
that count once in any order, top-ups, auto-refill charged exactly once per crossing, failed
refills, 402 with scale to zero when the balance is gone, and usage sent to Stripe's meter."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from eventually import eventually
from fakestripe import API_KEY, DECLINED, WEBHOOK_SECRET, FakeStripe, sign
from sqlalchemy.ext.asyncio import AsyncEngine
from stack import Platform, error_of, running_platform
from typer.testing import CliRunner

from kiln.billing.ledger import billing_rules
from kiln.billing.worker import BillingWorker
from kiln.cli.main import app as cli
from kiln.db.enums import LedgerKind, PaymentStatus
from kiln.db.models import (
    Customer,
    DailySpend,
    LedgerEntry,
    Payment,
    StripeEvent,
    StripeOutbox,
    UsageEvent,
)
from kiln.db.session import session_factory
from kiln.functions.package import package
from kiln.settings import Settings
from kiln.wire import UsageReport

pytestmark = pytest.mark.integration

UNIT = 1_000_000  # micro-units in one unit of the currency


@asynccontextmanager
async def paying_platform(
    settings: Settings, stripe_fake: FakeStripe, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    """A platform whose payments go to the fake Stripe, and whose webhooks come from it."""
    paying = settings.replace(
        stripe_api_key=API_KEY,
        stripe_api_base=stripe_fake.url,
        stripe_webhook_secret=WEBHOOK_SECRET,
    )
    async with running_platform(paying, tmp_path_factory.mktemp("stripe-home")) as running:
        yield running


@pytest.fixture(scope="module")
async def platform(
    settings: Settings, stripe_fake: FakeStripe, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    async with paying_platform(settings, stripe_fake, tmp_path_factory) as running:
        yield running


# Plans of the tiers' limits without their monthly fees, so that a balance is what a test pays in
# and uses: prepaid with pro's limits; invoiced with enterprise's, at its $0.01 a request.
PLANS: dict[str, dict[str, Any]] = {
    "pro": {"name": "metered", "tier": "pro"},
    "enterprise": {"name": "invoiced", "tier": "enterprise", "request_price_micros": 10_000},
}


async def new_customer(platform: Platform, tier: str = "pro", credit: int = 0) -> tuple[str, str]:
    """(customer id, account key), on the fee-less plan of `tier` (`PLANS`)."""
    async with platform.client() as operator:
        made = await operator.post("/v1/plans", json=PLANS[tier])
        assert made.status_code in (201, 409), made.text
        customer = (
            await operator.post(
                "/v1/customers", json={"name": "Payer", "plan": PLANS[tier]["name"]}
            )
        ).json()
        key = (
            await operator.post("/v1/keys", json={"kind": "account", "customer_id": customer["id"]})
        ).json()["key"]
        if credit:
            answer = await operator.post(
                "/v1/billing/credits", json={"customer_id": customer["id"], "amount_micros": credit}
            )
            assert answer.status_code == 201, answer.text
    return customer["id"], key


async def balance_of(engine: AsyncEngine, customer_id: str) -> int:
    async with engine.connect() as conn:
        value = await conn.scalar(
            sa.select(Customer.balance_micros).where(Customer.id == uuid.UUID(customer_id))
        )
    assert value is not None
    return value


def hour_of(customer_id: str, gpu: str, n: int) -> UsageReport:
    """An hour of one `gpu` for `customer_id`, as a replica would report it."""
    replica = str(uuid.uuid4())
    start = time.time() - 3600 - n
    return UsageReport(
        event_id=f"{replica}:1", replica_id=replica, customer_id=customer_id,
        function_id=str(uuid.uuid4()), gpu_type=gpu, gpu_count=1,
        period_start=start, period_end=start + 3600,
    )  # fmt: skip


async def checkout(platform: Platform, key: str, amount: int) -> dict[str, Any]:
    """A top-up through a Stripe Checkout page, as the customer starts it."""
    async with platform.client() as c:
        c.headers["Authorization"] = f"Bearer {key}"
        answer = await c.post("/v1/billing/topups", json={
            "amount_micros": amount, "success_url": "https://example.com/ok",
            "cancel_url": "https://example.com/no"})  # fmt: skip
    assert answer.status_code == 201, answer.text
    topup: dict[str, Any] = answer.json()
    return topup


# Webhooks ------------------------------------------------------------------------------------


async def test_webhooks_with_a_bad_signature_are_refused_and_change_nothing(
    platform: Platform, stripe_fake: FakeStripe, engine: AsyncEngine
) -> None:
    customer_id, key = await new_customer(platform)
    topup = await checkout(platform, key, 25 * UNIT)
    assert topup.get("checkout_url", "").startswith(f"{stripe_fake.url}/pay/cs_"), topup
    completed, _ = stripe_fake.complete_checkout(topup["checkout_url"].rsplit("/", 1)[1])
    payload = json.dumps(completed).encode()
    tampered = payload.replace(b'"paid"', b'"PAID"')
    cases = {
        "tampered": (tampered, sign(payload)),
        "missing": (payload, ""),
        "stale": (payload, sign(payload, at=int(time.time()) - 3600)),
        "other secret": (payload, sign(payload, secret="whsec_" + "x" * 32)),
    }
    async with platform.client() as c:
        for name, (body, signature) in cases.items():
            headers = {"stripe-signature": signature} if signature else {}
            answer = await c.post("/v1/billing/stripe/webhook", content=body, headers=headers)
            assert answer.status_code == 400, name
            assert error_of(answer)["code"] == "invalid_request", name
    async with engine.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(StripeEvent).where(
            StripeEvent.id == completed["id"])) == 0  # fmt: skip
    assert await balance_of(engine, customer_id) == 0


async def test_a_topup_is_credited_once_whatever_order_and_repeats_stripe_sends(
    platform: Platform, stripe_fake: FakeStripe, engine: AsyncEngine
) -> None:
    customer_id, key = await new_customer(platform)
    topup = await checkout(platform, key, 25 * UNIT)
    completed, succeeded = stripe_fake.complete_checkout(topup["checkout_url"].rsplit("/", 1)[1])
    failed = stripe_fake.event(
        "payment_intent.payment_failed",
        {**succeeded["data"]["object"], "status": "requires_payment_method",
         "last_payment_error": {"message": "an earlier attempt was declined"}},
    )  # fmt: skip
    # The intent's success first, then the session's, a stale failure, and a repeat.
    for event in (succeeded, completed, failed, succeeded):
        answer = await stripe_fake.deliver(platform.url, event)
        assert answer.status_code == 200, answer.text
    assert await balance_of(engine, customer_id) == 25 * UNIT
    async with engine.connect() as conn:
        credits = (await conn.execute(sa.select(LedgerEntry.kind, LedgerEntry.amount_micros).where(
            LedgerEntry.customer_id == uuid.UUID(customer_id)))).all()  # fmt: skip
        payment = (await conn.execute(sa.select(Payment).where(
            Payment.id == topup["payment_id"]))).one()  # fmt: skip
    assert credits == [(LedgerKind.TOPUP, 25 * UNIT)]
    assert payment.status is PaymentStatus.SUCCEEDED
    # The card paid with was saved for later: auto-refill can charge it.
    async with platform.client() as c:
        c.headers["Authorization"] = f"Bearer {key}"
        account = (await c.get("/v1/billing/balance")).json()
    assert account["payment_method"] is True
    assert account["balance_micros"] == 25 * UNIT


# Auto-refill ---------------------------------------------------------------------------------


async def _refill_customer(platform: Platform, method: str, balance: int) -> str:
    customer_id, _ = await new_customer(platform, credit=balance)
    async with platform.client() as operator:
        answer = await operator.patch("/v1/billing/settings", json={
            "customer_id": customer_id, "payment_method_id": method,
            "refill_threshold_micros": 5 * UNIT, "refill_amount_micros": 50 * UNIT})  # fmt: skip
        assert answer.status_code == 200, answer.text
    return customer_id


def _worker(platform: Platform, engine: AsyncEngine) -> BillingWorker:
    """A billing worker of the test's own, to charge reports at once and concurrently."""
    return BillingWorker(
        _NoNats(),  # type: ignore[arg-type]
        session_factory(engine),
        platform.settings.namespace,
        billing_rules(platform.settings),
        stream_replicas=1,
    )


class _NoNats:
    """Stands in for the NATS connection of a worker that only records: block announcements
    go nowhere (routers reread blocks from PostgreSQL)."""

    def jetstream(self) -> None:
        return None

    async def publish(self, subject: str, payload: bytes) -> None:
        return None


async def test_concurrent_crossings_of_the_refill_threshold_charge_the_card_once(
    platform: Platform, stripe_fake: FakeStripe, engine: AsyncEngine
) -> None:
    customer_id = await _refill_customer(platform, "pm_card_visa", 10 * UNIT)
    workers = [_worker(platform, engine) for _ in range(4)]
    # Eight H100 hours (3.9 units each) charged by four workers at once: the balance falls
    # from 10 through the threshold of 5 once.
    reports = [hour_of(customer_id, "H100", n) for n in range(8)]
    await asyncio.gather(*(w.record(reports[i::4]) for i, w in enumerate(workers)))
    refills = await eventually(lambda: _ledger(engine, customer_id, LedgerKind.REFILL), within_s=20)
    await eventually(lambda: _all_sent(engine, customer_id), within_s=20)  # a 2nd refill too
    assert await _ledger(engine, customer_id, LedgerKind.REFILL) == refills == [50 * UNIT]
    charged = _refill_intents(stripe_fake, customer_id)
    assert len(charged) == 1
    assert charged[0]["payment_method"] == "pm_card_visa"
    assert await balance_of(engine, customer_id) == 10 * UNIT - 8 * 3_900_000 + 50 * UNIT
    # Stripe's webhook for the same charge credits nothing more.
    succeeded = stripe_fake.event("payment_intent.succeeded", charged[0])
    assert (await stripe_fake.deliver(platform.url, succeeded)).status_code == 200
    assert await _ledger(engine, customer_id, LedgerKind.REFILL) == [50 * UNIT]


async def test_declined_refills_stop_after_the_limit_and_the_account_is_blocked(
    platform: Platform, stripe_fake: FakeStripe, engine: AsyncEngine
) -> None:
    customer_id = await _refill_customer(platform, DECLINED, 6 * UNIT)
    worker = _worker(platform, engine)
    limit = platform.settings.refill_max_failures
    for crossing in range(limit + 1):
        await worker.record([hour_of(customer_id, "H100", crossing)])  # below the threshold
        if crossing < limit:
            failed = partial(_failed_refills, engine, customer_id, crossing + 1)
            await eventually(failed, within_s=20)
        async with platform.client() as operator:  # back above it for the next crossing
            await operator.post("/v1/billing/credits", json={
                "customer_id": customer_id, "amount_micros": 3_900_000})  # fmt: skip
    await eventually(lambda: _all_sent(engine, customer_id), within_s=20)  # the last one's too
    attempts = _refill_intents(stripe_fake, customer_id)
    assert len(attempts) == limit  # the crossing after the limit charged nothing
    async with engine.connect() as conn:
        customer = (await conn.execute(sa.select(Customer).where(
            Customer.id == uuid.UUID(customer_id)))).one()  # fmt: skip
    assert customer.refill_failures == limit
    assert await _ledger(engine, customer_id, LedgerKind.REFILL) == []


def _refill_intents(fake: FakeStripe, customer_id: str) -> list[dict[str, Any]]:
    prefix = f"refill:{customer_id}:"
    return [
        i for i in fake.intents.values() if (i["metadata"]["kiln_payment"] or "").startswith(prefix)
    ]


async def _ledger(engine: AsyncEngine, customer_id: str, kind: LedgerKind) -> list[int]:
    async with engine.connect() as conn:
        rows = await conn.scalars(
            sa.select(LedgerEntry.amount_micros)
            .where(LedgerEntry.customer_id == uuid.UUID(customer_id), LedgerEntry.kind == kind)
            .order_by(LedgerEntry.id)
        )
        return list(rows)


async def _all_sent(engine: AsyncEngine, customer_id: str) -> bool:
    """Stripe was sent all that the customer's charges queued for it (a refill is queued with
    the charge that crosses the threshold, in its transaction)."""
    async with engine.connect() as conn:
        unsent = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(StripeOutbox)
            .where(StripeOutbox.customer_id == uuid.UUID(customer_id))
            .where(StripeOutbox.sent_at.is_(None))
        )
    assert unsent == 0, f"{unsent} outbox rows unsent"
    return True


async def _failed_refills(engine: AsyncEngine, customer_id: str, count: int) -> bool:
    async with engine.connect() as conn:
        failed = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(Payment)
            .where(
                Payment.customer_id == uuid.UUID(customer_id),
                Payment.status == PaymentStatus.FAILED,
            )
        )
    return bool(failed == count)


# 402 and scale to zero; usage on Stripe's meter ----------------------------------------------

APP = """
import kiln

app = kiln.App("prepaid")


@app.function(idle_timeout=300)
def work() -> str:
    return "done"
"""


async def test_a_used_up_balance_answers_402_and_scales_to_zero_until_money_comes(
    platform: Platform, stripe_fake: FakeStripe, engine: AsyncEngine, tmp_path: Path
) -> None:
    customer_id, key = await new_customer(platform, credit=1 * UNIT)
    app_file = tmp_path / "prepaid.py"
    app_file.write_text(APP)
    async with platform.client() as c:
        c.headers["Authorization"] = f"Bearer {key}"
        assert (await c.post("/v1/apps", json=package(app_file).deploy_body())).is_success
        assert (await c.post("/v1/run/prepaid/work")).json() == "done"
        assert len((await c.get("/v1/functions/prepaid/work/replicas")).json()["replicas"]) == 1

        async with platform.client() as operator:  # the money is gone
            await operator.post("/v1/billing/credits", json={
                "customer_id": customer_id, "amount_micros": -2 * UNIT})  # fmt: skip
        refused = await c.post("/v1/run/prepaid/work")
        assert refused.status_code == 402
        assert error_of(refused)["code"] == "insufficient_balance"
        assert "add funds" in error_of(refused)["message"]
        # Its replica scales to zero though its idle timeout is five minutes.
        await eventually(lambda: _no_replicas(c), within_s=30)

        async with platform.client() as operator:
            await operator.post("/v1/billing/credits", json={
                "customer_id": customer_id, "amount_micros": 5 * UNIT})  # fmt: skip
        assert (await c.post("/v1/run/prepaid/work")).json() == "done"

    # Every usage interval of that replica went to Stripe's meter once, to the millisecond.
    async with engine.connect() as conn:
        events = (await conn.execute(sa.select(UsageEvent.id, UsageEvent.duration_ms).where(
            UsageEvent.customer_id == uuid.UUID(customer_id)))).all()  # fmt: skip
    assert events
    metered = await eventually(lambda: _metered(stripe_fake, {e.id for e in events}), within_s=20)
    assert {i: int(m["payload"]["value"]) for i, m in metered.items()} == dict(events)


async def _no_replicas(c: Any) -> bool:
    answer = await c.get("/v1/functions/prepaid/work/replicas")
    return not answer.json()["replicas"]


async def _metered(fake: FakeStripe, ids: set[str]) -> dict[str, dict[str, Any]]:
    found = {i: fake.meter_events[i] for i in ids if i in fake.meter_events}
    return found if len(found) == len(ids) else {}


# Reports -------------------------------------------------------------------------------------


def _interval(customer_id: str, function_id: str, gpu: str, start: datetime, seconds: float,
              calls: int) -> UsageReport:  # fmt: skip
    replica = str(uuid.uuid4())
    return UsageReport(
        event_id=f"{replica}:1", replica_id=replica, customer_id=customer_id,
        function_id=function_id, gpu_type=gpu, gpu_count=1, period_start=start.timestamp(),
        period_end=start.timestamp() + seconds, calls=calls,
    )  # fmt: skip


async def test_usage_and_revenue_reports_add_up_to_the_ledger(
    platform: Platform, engine: AsyncEngine, tmp_path: Path
) -> None:
    customer_id, key = await new_customer(platform, tier="enterprise")
    f1, f2 = str(uuid.uuid4()), str(uuid.uuid4())
    day1 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    day2 = datetime(2026, 3, 2, 23, 0, tzinfo=UTC)
    reports = [
        _interval(customer_id, f1, "H100", day1, 3600, 10),
        _interval(customer_id, f1, "H100", day1.replace(hour=11), 1800, 5),
        _interval(customer_id, f2, "none", day1, 60, 2),
        _interval(customer_id, f1, "A10G", day2, 900, 1),
    ]
    assert await _worker(platform, engine).record(reports) == 4
    h100 = platform.settings.gpu_prices["H100"]
    cent = 10_000  # the enterprise plan's price of a request
    window = {"since": "2026-03-01", "until": "2026-03-03"}
    async with platform.client() as c:
        c.headers["Authorization"] = f"Bearer {key}"
        daily = (await c.get("/v1/billing/usage", params=window)).json()["rows"]
        assert sorted(daily, key=lambda r: (r["period"], r["function"] != f1)) == [
            {"period": "2026-03-01T00:00:00Z", "function": f1, "gpu_type": "H100",
             "replica_seconds": 5400.0, "calls": 15, "cost_micros": h100 * 3 // 2 + 15 * cent},
            {"period": "2026-03-01T00:00:00Z", "function": f2, "gpu_type": "none",
             "replica_seconds": 60.0, "calls": 2,
             "cost_micros": platform.settings.gpu_prices["none"] // 60 + 2 * cent},
            {"period": "2026-03-02T00:00:00Z", "function": f1, "gpu_type": "A10G",
             "replica_seconds": 900.0, "calls": 1,
             "cost_micros": platform.settings.gpu_prices["A10G"] // 4 + cent},
        ]  # fmt: skip
        hourly = (
            await c.get("/v1/billing/usage", params={**window, "granularity": "hour",
                                                     "group_by": "gpu_type"})
        ).json()["rows"]  # fmt: skip
        assert [(r["period"], r["gpu_type"], r["replica_seconds"]) for r in hourly] == [
            ("2026-03-01T10:00:00Z", "H100", 3600.0),
            ("2026-03-01T10:00:00Z", "none", 60.0),
            ("2026-03-01T11:00:00Z", "H100", 1800.0),
            ("2026-03-02T23:00:00Z", "A10G", 900.0),
        ]
        total = (await c.get("/v1/billing/usage", params={**window, "group_by": "none"})).json()
        charged = -sum(await _ledger(engine, customer_id, LedgerKind.USAGE))
        assert sum(r["cost_micros"] for r in total["rows"]) == charged
        csv_answer = await c.get("/v1/billing/usage", params={**window, "format": "csv"})
        assert csv_answer.headers["content-type"].startswith("text/csv")
        lines = csv_answer.text.splitlines()
        assert lines[0] == "period,function,gpu_type,replica_seconds,calls,cost_micros"
        assert len(lines) == 4
        bad_queries = (({"granularity": "week"}, "granularity"), ({"group_by": "app"}, "group_by"),
                       ({"since": "yesterday"}, "since"))  # fmt: skip
        for bad, word in bad_queries:
            refused = await c.get("/v1/billing/usage", params=bad)
            assert refused.status_code == 400
            assert word in error_of(refused)["message"]
        assert (await c.get("/v1/billing/revenue")).status_code == 403

    async with platform.client() as operator:  # charged today, so today's revenue has them
        revenue = (await operator.get("/v1/billing/revenue")).json()["rows"]
    enterprise = [r for r in revenue if r["tier"] == "enterprise"]
    assert sum(r["usage_revenue_micros"] for r in enterprise) >= charged
    assert sum(r["replica_seconds"] for r in enterprise) >= 6360.0

    env = {"KILN_URL": platform.url, "KILN_API_KEY": key, "KILN_HOME": str(tmp_path)}
    shown = await asyncio.to_thread(
        CliRunner().invoke, cli, ["billing", "report", "--since", "2026-03-01", "--until",
                                  "2026-03-03", "--csv"], env=env,
    )  # fmt: skip
    assert shown.exit_code == 0, shown.output
    assert shown.output == csv_answer.text
    account = await asyncio.to_thread(CliRunner().invoke, cli, ["billing", "balance"], env=env)
    assert account.exit_code == 0, account.output
    assert f"balance      {-charged / UNIT:,.2f} USD" in account.output


# Spend cap and minimum charge ----------------------------------------------------------------


async def test_the_daily_spend_cap_blocks_calls_until_raised_or_the_day_is_over(
    platform: Platform, engine: AsyncEngine
) -> None:
    customer_id, key = await new_customer(platform, tier="enterprise")
    async with platform.client() as operator:
        capped = await operator.patch("/v1/billing/settings", json={
            "customer_id": customer_id, "spend_cap_micros": 5 * UNIT})  # fmt: skip
        assert capped.json()["blocked"] is None
    worker = _worker(platform, engine)
    await worker.record([_just_ended(customer_id, 3600)])
    async with platform.client() as c:
        c.headers["Authorization"] = f"Bearer {key}"
        assert (await c.get("/v1/billing/balance")).json()["blocked"] is None  # 3.9 of 5
        await worker.record([_just_ended(customer_id, 1800)])
        account = (await c.get("/v1/billing/balance")).json()
        assert account["blocked"] == "spend_cap"
        # An hour and a half of H100, and the enterprise plan's $0.01 for each interval's call.
        assert account["spent_today_micros"] == 3_900_000 * 3 // 2 + 2 * 10_000
        # The router heard of it: calls are refused before any lookup of the function.
        refused = await eventually(lambda: _refused(c), within_s=20)
        assert "daily spend cap" in error_of(refused)["message"]
        # A late report for another day does not count toward today's cap.
        raised = await c.patch("/v1/billing/settings", json={"spend_cap_micros": 20 * UNIT})
        assert raised.json()["blocked"] is None
        late = datetime.now(UTC) - timedelta(days=3)
        await worker.record([_interval(customer_id, str(uuid.uuid4()), "H100", late, 36000, 1)])
        assert (await c.get("/v1/billing/balance")).json()["blocked"] is None
    # A block left from an earlier day is lifted by the worker's sweep.
    async with engine.begin() as conn:
        await conn.execute(sa.update(Customer).where(Customer.id == uuid.UUID(customer_id)).values(
            billing_block="spend_cap", spend_cap_micros=6 * UNIT))  # fmt: skip
        await conn.execute(sa.delete(DailySpend).where(
            DailySpend.customer_id == uuid.UUID(customer_id)))  # fmt: skip
    await worker.sweep_blocks()
    async with engine.connect() as conn:
        block = await conn.scalar(
            sa.select(Customer.billing_block).where(Customer.id == uuid.UUID(customer_id))
        )
    assert block is None


def _just_ended(customer_id: str, seconds: float) -> UsageReport:
    """An H100 interval of `seconds` that ended a moment ago (today, in UTC)."""
    start = datetime.now(UTC) - timedelta(seconds=seconds + 0.5)
    return _interval(customer_id, str(uuid.uuid4()), "H100", start, seconds, 1)


async def _refused(c: Any) -> httpx.Response:
    answer: httpx.Response = await c.post("/v1/run/nothing/here")
    assert answer.status_code == 402, answer.text
    return answer


async def test_a_minimum_charge_bills_a_short_replica_up_to_the_minimum_once(
    platform: Platform, engine: AsyncEngine
) -> None:
    customer_id, _ = await new_customer(platform, tier="enterprise")
    rules = replace(billing_rules(platform.settings), min_charge_s=60)
    worker = BillingWorker(
        _NoNats(),  # type: ignore[arg-type]
        session_factory(engine),
        platform.settings.namespace,
        rules,
        stream_replicas=1,
    )
    start = time.time() - 100
    short = replace(_interval(customer_id, str(uuid.uuid4()), "none",
                              datetime.fromtimestamp(start, UTC), 12.5, 3),
                    final=True, since=start)  # fmt: skip
    tail = replace(short, event_id=short.replica_id + ":2", period_start=start + 12.5,
                   period_end=start + 12.52)  # the node agent's few ms to the exit  # fmt: skip
    assert await worker.record([short, tail, short]) == 2
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(UsageEvent.id, UsageEvent.duration_ms).where(
            UsageEvent.replica_id == uuid.UUID(short.replica_id)))).all()  # fmt: skip
    assert dict(rows) == {short.event_id: 12_500, tail.event_id: 20,
                          f"{short.replica_id}:minimum": 47_500}  # fmt: skip

"""Closing billing periods into invoices (issue 25) on a real PostgreSQL: the brief's month to
the cent, a month with a plan change midway, a close run twice or killed halfway giving one
invoice per customer with gapless numbers, invoices that cannot be changed once issued, and
late usage billed on the next invoice.

Test months are in 2031: the platform's billing service closes ended periods by itself, and a
customer created (as far as the database knows) in the future is in none of them."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from eventually import eventually
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from stack import Platform
from test_plans_e2e import _NoNats, balance, calls, customer_on, worker
from typer.testing import CliRunner, Result

from kiln.billing.invoice_worker import InvoiceWorker, last_ended_period
from kiln.billing.invoices import close_customer, close_period
from kiln.billing.ledger import Changes, billing_rules, post_entry
from kiln.billing.plans import change_plan, charge_period_fee, period_of
from kiln.cli.main import app as cli
from kiln.console.mail import Mailer
from kiln.db.enums import (
    CustomerTier,
    InvoiceLineKind,
    InvoiceStatus,
    LedgerKind,
    PodKind,
    PodState,
    Settlement,
)
from kiln.db.models import (
    App,
    AppVersion,
    Customer,
    Function,
    Invoice,
    InvoiceLine,
    LedgerEntry,
    PeriodClose,
    Plan,
    Pod,
)
from kiln.db.session import session_factory, transaction
from kiln.wire import UsageReport

pytestmark = [pytest.mark.integration]

USD = 1_000_000
MARCH = datetime(2031, 3, 1, tzinfo=UTC)
APRIL = datetime(2031, 4, 1, tzinfo=UTC)
CLOSED_AT = datetime(2031, 4, 1, 2, tzinfo=UTC)


async def lines_of(engine: AsyncEngine, invoice_id: uuid.UUID) -> list[tuple[str, int, int]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(InvoiceLine.kind, InvoiceLine.quantity, InvoiceLine.amount_micros)
            .where(InvoiceLine.invoice_id == invoice_id)
            .order_by(InvoiceLine.position)
        )
        return [(str(kind), int(quantity), int(amount)) for kind, quantity, amount in rows]


async def billed(engine: AsyncEngine, invoice_id: uuid.UUID) -> int:
    """What the ledger entries the invoice took add up to, as a charge."""
    async with engine.connect() as conn:
        total = await conn.scalar(
            sa.select(sa.func.sum(LedgerEntry.amount_micros)).where(
                LedgerEntry.invoice_id == invoice_id
            )
        )
    return -int(total or 0)


async def invoices_of(engine: AsyncEngine, customer_id: uuid.UUID) -> list[Invoice]:
    async with transaction(session_factory(engine)) as session:
        found = await session.scalars(
            sa.select(Invoice).where(Invoice.customer_id == customer_id).order_by(Invoice.period)
        )
        return list(found)


async def close(
    platform: Platform, engine: AsyncEngine, customer_id: uuid.UUID, moment: datetime = MARCH
) -> Invoice:
    summary = await close_period(
        session_factory(engine), period_of(moment), billing_rules(platform.settings),
        customer_id=customer_id, now=CLOSED_AT,
    )  # fmt: skip
    (invoice,) = [i for i in await invoices_of(engine, customer_id) if i.period == summary.period]
    return invoice


def gpu_time(customer_id: uuid.UUID, start: datetime, seconds: float, gpu: str) -> UsageReport:
    replica = str(uuid.uuid4())
    return UsageReport(
        event_id=f"{replica}:1", replica_id=replica, customer_id=str(customer_id),
        function_id=str(uuid.uuid4()), gpu_type=gpu, gpu_count=1,
        period_start=start.timestamp(), period_end=start.timestamp() + seconds,
    )  # fmt: skip


async def test_the_briefs_enterprise_month_is_invoiced_at_2864_dollars_50(
    platform: Platform, engine: AsyncEngine
) -> None:
    customer_id = await customer_on(engine, "enterprise", MARCH)
    rules = billing_rules(platform.settings)
    async with transaction(session_factory(engine)) as session:
        customer = await session.get_one(Customer, customer_id, with_for_update=True)
        await charge_period_fee(session, customer, period_of(MARCH), rules, Changes())
    reports = [calls(customer_id, MARCH.replace(day=1 + i % 28), 1215) for i in range(30)]
    await worker(platform, engine).record(reports)

    invoice = await close(platform, engine, customer_id)
    assert invoice.total_micros == 2_864_500_000
    assert (invoice.status, invoice.settlement) == (InvoiceStatus.OPEN, Settlement.COLLECT)
    assert await lines_of(engine, invoice.id) == [
        (InvoiceLineKind.FEE, 1, 2_500 * USD),
        (InvoiceLineKind.REQUESTS, 36_450, 364_500_000),
    ]
    assert await billed(engine, invoice.id) == invoice.total_micros


async def test_a_month_with_a_plan_change_midway_is_one_invoice_with_its_prorations(
    platform: Platform, engine: AsyncEngine
) -> None:
    customer_id = await customer_on(engine, "pro", MARCH)
    rules = billing_rules(platform.settings)
    midway = datetime(2031, 3, 16, tzinfo=UTC)
    async with transaction(session_factory(engine)) as session:
        await change_plan(session, customer_id, "enterprise", midway, rules, Changes())
    await worker(platform, engine).record(
        [gpu_time(customer_id, MARCH.replace(day=3), 3600, "H100"),
         gpu_time(customer_id, MARCH.replace(day=20), 1800, "H100"),
         gpu_time(customer_id, MARCH.replace(day=21), 60, "A10G")]
    )  # fmt: skip

    invoice = await close(platform, engine, customer_id)
    lines = await lines_of(engine, invoice.id)
    kinds = [kind for kind, _, _ in lines]
    assert kinds[:3] == [InvoiceLineKind.FEE, InvoiceLineKind.PRORATION, InvoiceLineKind.PRORATION]
    gpu = {quantity: amount for kind, quantity, amount in lines if kind == InvoiceLineKind.GPU}
    assert set(gpu) == {5_400_000, 60_000}  # GPU-milliseconds by type: H100's two, A10G's one
    month, rest = 31 * 86_400, 16 * 86_400
    fees = 500 * USD - 500 * USD * rest // month + 2_500 * USD * rest // month
    plan_lines = (InvoiceLineKind.FEE, InvoiceLineKind.PRORATION)
    assert sum(amount for kind, _, amount in lines if kind in plan_lines) == fees
    # Whole cents, and exactly what the ledger says (the rounding credit is in it too).
    assert invoice.total_micros % 10_000 == 0
    assert sum(amount for _, _, amount in lines) == invoice.total_micros
    assert await billed(engine, invoice.id) == invoice.total_micros


async def test_closing_again_changes_nothing_and_late_usage_goes_on_the_next_invoice(
    platform: Platform, engine: AsyncEngine
) -> None:
    customer_id = await customer_on(engine, "enterprise", MARCH)
    recorder = worker(platform, engine)
    await recorder.record([calls(customer_id, MARCH.replace(day=9), 100)])
    first = await close(platform, engine, customer_id)
    again = await close(platform, engine, customer_id)
    assert (again.id, again.number) == (first.id, first.number)
    # Reported after March closed, for March: on April's invoice, not lost, not twice.
    await recorder.record([calls(customer_id, MARCH.replace(day=30), 7)])
    await recorder.record([calls(customer_id, APRIL.replace(day=2), 3)])
    april = await close(platform, engine, customer_id, APRIL)
    assert (InvoiceLineKind.REQUESTS, 10, 100_000) in await lines_of(engine, april.id)
    assert first.total_micros == 100 * 10_000
    assert (first.number or 0) < (april.number or 0)


async def test_a_prepaid_customers_invoice_is_a_statement_paid_from_the_balance(
    platform: Platform, engine: AsyncEngine
) -> None:
    customer_id = await customer_on(engine, "pro", MARCH)
    rules = billing_rules(platform.settings)
    async with transaction(session_factory(engine)) as session:
        customer = await session.get_one(Customer, customer_id, with_for_update=True)
        await charge_period_fee(session, customer, period_of(MARCH), rules, Changes())
    invoice = await close(platform, engine, customer_id)
    assert (invoice.settlement, invoice.status) == (Settlement.BALANCE, InvoiceStatus.PAID)
    assert invoice.total_micros == 500 * USD


async def test_nothing_to_bill_makes_no_invoice(platform: Platform, engine: AsyncEngine) -> None:
    customer_id = await customer_on(engine, "free", MARCH)
    async with transaction(session_factory(engine)) as session:
        invoice, made = await close_customer(
            session, customer_id, period_of(MARCH), billing_rules(platform.settings), Changes(),
            now=CLOSED_AT,
        )  # fmt: skip
    assert (invoice, made) == (None, False)
    assert await invoices_of(engine, customer_id) == []


async def test_an_issued_invoice_cannot_be_changed(platform: Platform, engine: AsyncEngine) -> None:
    customer_id = await customer_on(engine, "enterprise", MARCH)
    await worker(platform, engine).record([calls(customer_id, MARCH, 5)])
    invoice = await close(platform, engine, customer_id)
    tries = [
        sa.update(Invoice).where(Invoice.id == invoice.id).values(total_micros=1),
        sa.update(Invoice).where(Invoice.id == invoice.id).values(status=InvoiceStatus.DRAFT,
                                                                   number=None),
        sa.delete(Invoice).where(Invoice.id == invoice.id),
        sa.update(InvoiceLine).where(InvoiceLine.invoice_id == invoice.id).values(
            amount_micros=0),
        sa.insert(InvoiceLine).values(invoice_id=invoice.id, position=99, kind="adjustment",
                                      description="x", quantity=1, unit="item", amount_micros=-1),
    ]  # fmt: skip
    for statement in tries:
        with pytest.raises(DBAPIError, match="final"):
            async with engine.begin() as conn:
                await conn.execute(statement)
    # Its payment and delivery may change.
    async with engine.begin() as conn:
        await conn.execute(
            sa.update(Invoice).where(Invoice.id == invoice.id).values(mailed_to="a@b.example")
        )


KILLABLE_CLOSE = """
import asyncio, os, sys
from datetime import datetime, UTC
from kiln.billing.invoices import close_period
from kiln.billing.ledger import billing_rules
from kiln.billing.plans import period_of
from kiln.db.session import create_engine, session_factory
from kiln.settings import Settings

async def main():
    settings = Settings.from_env(os.environ)
    engine = create_engine(settings, application_name="kiln-close")
    print("closing", flush=True)
    await close_period(session_factory(engine), period_of(datetime(2031, 5, 2, tzinfo=UTC)),
                       billing_rules(settings), now=datetime(2031, 6, 1, 2, tzinfo=UTC))
    print("closed", flush=True)

asyncio.run(main())
"""


async def test_a_close_killed_halfway_and_run_again_gives_one_invoice_each_without_gaps(
    platform: Platform, engine: AsyncEngine
) -> None:
    may = datetime(2031, 5, 1, tzinfo=UTC)
    customers = [await customer_on(engine, "enterprise", may) for _ in range(120)]
    await worker(platform, engine).record(
        [calls(c, may.replace(day=5), 1 + i) for i, c in enumerate(customers)]
    )
    env = {**os.environ, "KILN_DATABASE_URL": platform.settings.require("database_url"),
           "KILN_HOME": str(platform.settings.home)}  # fmt: skip

    async def made() -> int:
        async with engine.connect() as conn:
            count = await conn.scalar(
                sa.select(sa.func.count()).select_from(Invoice).where(Invoice.period == "2031-05")
            )
        return int(count or 0)

    async def some_made() -> bool:
        return await made() > 0

    process = await asyncio.create_subprocess_exec(  # a close of its own, killed mid-way
        sys.executable, "-c", KILLABLE_CLOSE, env=env, stdout=subprocess.DEVNULL
    )
    try:
        await eventually(some_made, within_s=60)
    finally:
        process.send_signal(signal.SIGKILL)
        await asyncio.wait_for(process.wait(), 10)
    halfway = await made()
    assert 0 < halfway < len(customers), "the kill came too late to test anything"

    rerun = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLABLE_CLOSE, env=env, stderr=subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(rerun.communicate(), 120)
    assert rerun.returncode == 0, stderr.decode()
    invoices = {i.customer_id: i for c in customers for i in await invoices_of(engine, c)}
    assert len(invoices) == len(customers)  # one each
    for index, customer_id in enumerate(customers):
        invoice = invoices[customer_id]
        assert invoice.total_micros == (1 + index) * 10_000  # its requests at $0.01
        assert await billed(engine, invoice.id) == invoice.total_micros
    async with engine.connect() as conn:
        numbers = list(await conn.scalars(sa.select(Invoice.number).order_by(Invoice.number)))
        loose = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(LedgerEntry)
            .where(LedgerEntry.customer_id.in_(customers), LedgerEntry.invoice_id.is_(None))
        )
    assert numbers == list(range(1, len(numbers) + 1))  # every invoice ever: no gaps
    assert loose == 0  # every entry on exactly one invoice


async def per_request_plan(engine: AsyncEngine) -> str:
    """A postpaid plan of $0.01 a request and no fee: a plan of enterprise's limits."""
    async with engine.begin() as conn:
        await conn.execute(
            insert(Plan)
            .values(name="per-request", tier=CustomerTier.ENTERPRISE, request_price_micros=10_000)
            .on_conflict_do_nothing(index_elements=[Plan.name])
        )
    return "per-request"


async def account_key(platform: Platform, customer_id: uuid.UUID) -> str:
    async with platform.client() as operator:
        made = await operator.post(
            "/v1/keys", json={"kind": "account", "customer_id": str(customer_id)}
        )
    return str(made.json()["key"])


async def test_invoices_over_http_json_csv_and_pdf_each_customer_its_own(
    platform: Platform, engine: AsyncEngine, tmp_path: Path
) -> None:
    # The current period, closed early (a final invoice): HTTP refuses periods to come.
    now = datetime.now(UTC)
    month = period_of(now).label
    plan = await per_request_plan(engine)
    mine = await customer_on(engine, plan, now)
    theirs = await customer_on(engine, plan, now)
    await worker(platform, engine).record([calls(mine, now, 250), calls(theirs, now, 1)])
    async with platform.client() as operator:
        closes = [
            await operator.post(
                "/v1/billing/close", json={"period": month, "customer_id": str(customer)}
            )
            for customer in (mine, mine, theirs)
        ]
    assert closes[0].status_code == 200, closes[0].text
    made = [(c.json()["created"], c.json()["existing"]) for c in closes]
    assert made == [(1, 0), (0, 1), (1, 0)]
    (invoice_id,) = closes[0].json()["invoices"]

    async with platform.client() as client:
        client.headers["Authorization"] = f"Bearer {await account_key(platform, mine)}"
        listed = (await client.get("/v1/billing/invoices")).json()["invoices"]
        one = (await client.get(f"/v1/billing/invoices/{invoice_id}")).json()
        csv = await client.get(f"/v1/billing/invoices/{invoice_id}", params={"format": "csv"})
        pdf = await client.get(f"/v1/billing/invoices/{invoice_id}", params={"format": "pdf"})
        others = await client.get("/v1/billing/invoices", params={"customer_id": str(theirs)})
        bad = await client.get("/v1/billing/invoices", params={"period": "2031-13"})
        denied = await client.post("/v1/billing/close", json={})
    assert [i["id"] for i in listed] == [invoice_id]  # only its own
    assert (one["total_micros"], one["status"]) == (2_500_000, "open")
    assert one["amount_due_micros"] == 2_500_000
    assert [(line["kind"], line["quantity"]) for line in one["lines"]] == [("requests", 250)]
    assert csv.headers["content-type"].startswith("text/csv")
    assert csv.text.splitlines()[-1].endswith(",total,Total (USD),,,,2.50,2500000")
    assert others.status_code == 404
    assert bad.status_code == 400
    assert (
        "period='2031-13' is not valid: expected a month as YYYY-MM"
        in bad.json()["error"]["message"]
    )
    assert denied.status_code == 403
    # The PDF opens: poppler renders its first page.
    assert pdf.headers["content-type"] == "application/pdf"
    pdftoppm = shutil.which("pdftoppm")
    if pdftoppm is None:
        pytest.skip("pdftoppm is missing: apt-get install poppler-utils")
    (tmp_path / "invoice.pdf").write_bytes(pdf.content)
    rendered = await asyncio.create_subprocess_exec(
        pdftoppm, "-png", "-r", "50", "-f", "1", "-l", "1", str(tmp_path / "invoice.pdf"),
        str(tmp_path / "page"), stderr=subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(rendered.communicate(), 60)
    assert rendered.returncode == 0, stderr.decode()
    (page,) = await asyncio.to_thread(lambda: list(tmp_path.glob("page*.png")))
    assert page.stat().st_size > 1000


async def test_bad_closes_are_refused_by_name(platform: Platform) -> None:
    async with platform.client() as operator:
        future = await operator.post("/v1/billing/close", json={"period": "2999-01"})
        nobody = await operator.post(
            "/v1/billing/close", json={"period": "2026-01", "customer_id": str(uuid.uuid4())}
        )
        odd = await operator.post("/v1/billing/close", json={"period": "March"})
        unknown = await operator.post(
            f"/v1/billing/invoices/{uuid.uuid4()}/payments", json={"reference": "wire 1"}
        )
    assert future.status_code == 400
    assert (
        "period '2999-01' has not begun; close the current one" in future.json()["error"]["message"]
    )
    assert nobody.status_code == 404
    assert odd.status_code == 400
    assert unknown.status_code == 404


async def test_the_cli_closes_lists_and_records_a_payment_and_revenue_follows(
    platform: Platform, engine: AsyncEngine, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    month = period_of(now).label
    customer_id = await customer_on(engine, "enterprise", now)
    rules = billing_rules(platform.settings)
    async with transaction(session_factory(engine)) as session:
        customer = await session.get_one(Customer, customer_id, with_for_update=True)
        await charge_period_fee(session, customer, period_of(now), rules, Changes())
    fee = -(await balance(engine, customer_id))
    env = {"KILN_URL": platform.url, "KILN_API_KEY": platform.key, "KILN_HOME": str(tmp_path)}

    def kiln(*args: str) -> Result:
        return CliRunner().invoke(cli, list(args), env=env)

    closed = await asyncio.to_thread(
        kiln, "billing", "close", "--period", month, "--customer", str(customer_id)
    )
    assert closed.exit_code == 0, closed.output
    assert closed.output.startswith(f"{month}: 1 invoices issued, 0 issued before")
    listed = await asyncio.to_thread(
        kiln, "billing", "invoices", "--customer", str(customer_id), "--json"
    )
    (invoice,) = json.loads(listed.output)
    assert invoice["total_micros"] == fee - fee % 10_000  # to a whole cent
    saved = tmp_path / "invoice.csv"
    got = await asyncio.to_thread(
        kiln, "billing", "invoices", invoice["id"], "--format", "csv", "-o", str(saved)
    )
    assert got.exit_code == 0, got.output
    assert f"Enterprise plan, {month}" in saved.read_text()
    paid = await asyncio.to_thread(
        kiln, "billing", "pay", invoice["id"], "--reference", "wire 2031-07-15"
    )
    assert paid.exit_code == 0, paid.output
    assert paid.output.rstrip().endswith("paid")
    assert await balance(engine, customer_id) == 0  # the fee, the rounding, the payment
    revenue = await asyncio.to_thread(
        kiln, "billing", "plans-revenue", "--since", month, "--until", month
    )
    assert revenue.exit_code == 0, revenue.output
    assert f"{month}  enterprise" in revenue.output
    assert "MRR " in revenue.output


async def test_the_last_ended_period_closes_by_itself_once(
    platform: Platform, engine: AsyncEngine
) -> None:
    invoicing = InvoiceWorker(
        _NoNats(),  # type: ignore[arg-type]
        session_factory(engine), billing_rules(platform.settings), Mailer(platform.settings),
        namespace=platform.settings.namespace, close_delay_s=3600, issuer="Kiln",
    )  # fmt: skip
    # Early on 1 January, within the delay: December is not closed yet, November is the last.
    assert last_ended_period(datetime(2026, 1, 1, 0, 30, tzinfo=UTC), timedelta(hours=1)).label == (
        "2025-11"
    )
    # A period before any customer existed: closed (nobody to bill), and remembered.
    first = await invoicing.close_due(datetime(2025, 2, 1, 1, 30, tzinfo=UTC))
    assert first is not None
    assert (first.period, first.created, first.empty) == ("2025-01", [], 0)
    assert await invoicing.close_due(datetime(2025, 2, 3, tzinfo=UTC)) is None
    async with engine.connect() as conn:
        assert await conn.scalar(sa.select(PeriodClose.invoices).where(
            PeriodClose.period == "2025-01")) == 0  # fmt: skip


async def test_a_credit_larger_than_the_month_is_carried_to_the_next_invoice(
    platform: Platform, engine: AsyncEngine
) -> None:
    august = datetime(2031, 8, 1, tzinfo=UTC)
    customer_id = await customer_on(engine, await per_request_plan(engine), august)
    recorder = worker(platform, engine)
    await recorder.record([calls(customer_id, august.replace(day=3), 100)])  # $1.00
    async with transaction(session_factory(engine)) as session:  # an operator's $5 credit
        customer = await session.get_one(Customer, customer_id, with_for_update=True)
        await post_entry(session, customer, kind=LedgerKind.ADJUSTMENT, amount=5 * USD,
                         external_id=f"goodwill:{customer_id}", description="goodwill")  # fmt: skip
    august_invoice = await close(platform, engine, customer_id, august)
    assert (august_invoice.total_micros, august_invoice.status) == (0, InvoiceStatus.PAID)
    assert (InvoiceLineKind.ADJUSTMENT, 1, 4 * USD) in await lines_of(engine, august_invoice.id)
    september = datetime(2031, 9, 1, tzinfo=UTC)
    await recorder.record([calls(customer_id, september.replace(day=2), 700)])  # $7.00
    september_invoice = await close(platform, engine, customer_id, september)
    assert september_invoice.total_micros == 3 * USD  # $7 less the $4 carried
    assert await balance(engine, customer_id) == -3 * USD  # what is owed, and no more


async def test_a_customer_whose_close_fails_stops_no_other_and_the_period_stays_open(
    platform: Platform, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kiln.billing.invoices as invoices

    october = datetime(2031, 10, 1, tzinfo=UTC)
    broken = await customer_on(engine, "enterprise", october)
    fine = await customer_on(engine, "enterprise", october)
    await worker(platform, engine).record([calls(broken, october, 1), calls(fine, october, 2)])
    original = invoices.close_customer

    async def failing(session: object, customer_id: uuid.UUID, *args: object, **kw: object):  # type: ignore[no-untyped-def]
        if customer_id == broken:
            raise RuntimeError("the database said no")
        return await original(session, customer_id, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(invoices, "close_customer", failing)
    summary = await close_period(
        session_factory(engine), period_of(october), billing_rules(platform.settings),
        now=datetime(2031, 11, 1, 2, tzinfo=UTC),
    )  # fmt: skip
    assert broken in summary.failed
    assert [i.total_micros for i in await invoices_of(engine, fine)] == [20_000]
    async with engine.connect() as conn:  # not remembered as closed: the next sweep retries
        assert await conn.scalar(
            sa.select(PeriodClose.period).where(PeriodClose.period == "2031-10")
        ) is None  # fmt: skip


async def _pod_with_volume(
    engine: AsyncEngine, customer_id: uuid.UUID, created: datetime, gb: int
) -> uuid.UUID:
    """A pod of `gb` on a function of its customer's, created at `created`."""
    async with transaction(session_factory(engine)) as session:
        app = App(customer_id=customer_id, name=f"env-{uuid.uuid4().hex[:8]}")
        version = AppVersion(version=1, source_digest="0" * 64, artifact_key="code/0")
        app.versions.append(version)
        app.current_version = version
        function = Function(name="base", current_version=version)
        app.functions.append(function)
        session.add(app)
        await session.flush()
        pod = Pod(
            customer_id=customer_id, name="notebook", kind=PodKind.POD, function_id=function.id,
            volume_gb=gb, created_at=created, state=PodState.STOPPED,
        )  # fmt: skip
        session.add(pod)
        await session.flush()
        return pod.id


async def test_a_volume_is_charged_per_gb_hour_once_and_invoiced_with_its_gb_hours(
    platform: Platform, engine: AsyncEngine
) -> None:
    customer_id = await customer_on(engine, "enterprise", MARCH)
    billing = worker(platform, engine)
    price = billing.rules.volume_price_gb_hour
    assert price > 0  # the default prices storage
    created = MARCH + timedelta(days=2, minutes=10)
    pod_id = await _pod_with_volume(engine, customer_id, created, 10)

    # Its whole hours are charged as they pass, each once however often the sweep runs.
    assert await billing.charge_storage(created + timedelta(minutes=59)) == 0
    assert await billing.charge_storage(created + timedelta(hours=2, minutes=30)) == 1
    assert await billing.charge_storage(created + timedelta(hours=2, minutes=31)) == 0
    assert await balance(engine, customer_id) == -2 * 10 * price
    # It ends 3 h 20 min after its creation: the rest is charged to the millisecond, once.
    async with transaction(session_factory(engine)) as session:
        pod = await session.get_one(Pod, pod_id)
        pod.state, pod.ended_at = PodState.ENDED, created + timedelta(hours=3, minutes=20)
    assert await billing.charge_storage(created + timedelta(hours=5)) == 1
    assert await billing.charge_storage(created + timedelta(hours=9)) == 0
    assert await balance(engine, customer_id) == -(10 * price * 200 // 60)

    invoice = await close(platform, engine, customer_id)
    lines = await lines_of(engine, invoice.id)
    assert lines[0] == (InvoiceLineKind.STORAGE, 10 * 200 * 60, 10 * price * 200 // 60)
    assert [kind for kind, *_ in lines[1:]] in ([], [InvoiceLineKind.ROUNDING])
    assert await billed(engine, invoice.id) == invoice.total_micros

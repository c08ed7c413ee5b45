"""How long closing a billing period takes (issue 25): 10,000 postpaid customers with 100
ledger entries each (a plan fee, 97 usage intervals over two GPU types with requests, two
adjustments), closed by the same code the billing service and `kiln billing close` run. One
run prints the close against its floor, PostgreSQL summing the same entries in one query,
and the close again (which finds every invoice made and changes nothing).

    .venv/bin/python bench/billing_close.py [--customers 10000] [--entries 100]
        [--database-url postgresql://...]

Without `--database-url` (or `KILN_DATABASE_URL`) it starts the embedded PostgreSQL that
`kiln dev` uses, in a temporary directory. Either way the data goes into a scratch database
made for the run and dropped after it. The history is written straight into PostgreSQL with
`generate_series`, as the billing worker would have charged it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import sqlalchemy as sa

from kiln.billing.invoices import close_period
from kiln.billing.ledger import billing_rules
from kiln.billing.plans import period_of
from kiln.db import migrate
from kiln.db.models import Invoice, LedgerEntry
from kiln.db.session import create_engine, session_factory
from kiln.devstack.ports import pick_port
from kiln.devstack.postgres import EmbeddedPostgres
from kiln.settings import Settings

MARCH = datetime(2031, 3, 1, tzinfo=UTC)
CLOSED_AT = datetime(2031, 4, 1, 2, tzinfo=UTC)

# START, CUSTOMERS and INTERVALS are filled in (a timestamp and two counts) before it runs.
HISTORY = """
INSERT INTO customers (id, name, tier, plan, plan_since, created_at)
SELECT gen_random_uuid(), 'bench ' || i, 'enterprise', 'enterprise', START, START
FROM generate_series(1, CUSTOMERS) AS i;

INSERT INTO ledger_entries (customer_id, kind, amount_micros, external_id, description, created_at)
SELECT id, 'fee', -2500000000, 'fee:' || id || ':2031-03', 'Enterprise plan, 2031-03', START
FROM customers WHERE name LIKE 'bench %';

INSERT INTO usage_events (id, replica_id, customer_id, function_id, gpu_type, gpu_count,
    period_start, period_end, duration_ms, calls, gpu_cost_micros, billed_requests,
    request_cost_micros)
SELECT c.id || ':' || j, c.id, c.id, c.id, CASE WHEN j % 3 = 0 THEN 'A10G' ELSE 'H100' END, 1,
    START + j * interval '5 hours',
    START + j * interval '5 hours' + interval '10 seconds', 10000,
    37, 9876 + j, 37, 370000
FROM customers c, generate_series(1, INTERVALS) AS j WHERE c.name LIKE 'bench %';

INSERT INTO ledger_entries (customer_id, kind, amount_micros, usage_event_id, description,
    created_at)
SELECT customer_id, 'usage', -(gpu_cost_micros + request_cost_micros), id, '10000 ms', period_end
FROM usage_events;

INSERT INTO ledger_entries (customer_id, kind, amount_micros, description, created_at)
SELECT id, 'adjustment', CASE WHEN k = 1 THEN 1234567 ELSE -333 END, 'bench adjustment',
    START + interval '20 days'
FROM customers, generate_series(1, 2) AS k WHERE name LIKE 'bench %';
"""

FLOOR = """
SELECT customer_id, sum(amount_micros) FROM ledger_entries
WHERE invoice_id IS NULL AND kind NOT IN ('topup', 'refill', 'payment')
GROUP BY customer_id
"""


async def write_history(url: str, customers: int, entries: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        history = (
            HISTORY.replace("START", f"'{MARCH.isoformat()}'::timestamptz")
            .replace("CUSTOMERS", str(int(customers)))
            .replace("INTERVALS", str(int(entries) - 3))  # a fee and two adjustments besides
        )
        await conn.execute(history)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def timed_floor(url: str) -> float:
    conn = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        await conn.fetch(FLOOR)
        return time.perf_counter() - started
    finally:
        await conn.close()


async def run(settings: Settings, customers: int, entries: int) -> None:
    url = settings.require("database_url")
    print(f"writing {customers:,} customers x {entries} ledger entries ...", flush=True)
    started = time.perf_counter()
    await write_history(url, customers, entries)
    print(f"  written in {time.perf_counter() - started:.1f} s", flush=True)
    floor = await timed_floor(url)
    engine = create_engine(settings, application_name="kiln-bench-close")
    sessions = session_factory(engine)
    rules = billing_rules(settings)
    try:
        started = time.perf_counter()
        first = await close_period(sessions, period_of(MARCH), rules, now=CLOSED_AT)
        close_s = time.perf_counter() - started
        started = time.perf_counter()
        again = await close_period(sessions, period_of(MARCH), rules, now=CLOSED_AT)
        again_s = time.perf_counter() - started
        async with engine.connect() as conn:
            invoices = await conn.scalar(sa.select(sa.func.count()).select_from(Invoice))
            loose = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(LedgerEntry)
                .where(LedgerEntry.invoice_id.is_(None))
            )
    finally:
        await engine.dispose()
    assert len(first.created) == customers == invoices, (len(first.created), invoices)
    assert (len(again.created), len(again.existing)) == (0, customers)
    assert loose == 0
    rows = [
        ("floor: one GROUP BY over the same entries", floor, None),
        ("Kiln: close the period (one transaction a customer)", close_s, customers / close_s),
        ("Kiln: close it again (nothing new)", again_s, customers / again_s),
    ]
    print(f"\n{customers:,} customers x {entries} entries ({customers * entries:,} entries), "
          f"PostgreSQL at {url.split('@')[-1]}")  # fmt: skip
    print(f"{'':<55} {'seconds':>9} {'customers/s':>12}")
    for name, seconds, rate in rows:
        print(f"{name:<55} {seconds:>9.2f} {'' if rate is None else f'{rate:,.0f}':>12}")
    print(f"per invoice: {1000 * close_s / customers:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--entries", type=int, default=100)
    parser.add_argument("--database-url", default=os.environ.get("KILN_DATABASE_URL"))
    args = parser.parse_args()
    if args.entries < 4:
        parser.error("--entries must be at least 4 (a fee, two adjustments and usage)")
    with ExitStack() as exits:
        server = args.database_url
        if server is None:
            root = Path(exits.enter_context(tempfile.TemporaryDirectory(prefix="kiln-bench-")))
            postgres = EmbeddedPostgres(root, {"port": pick_port([None], set())}, durable=False)
            postgres.start(timeout_s=60)
            exits.callback(postgres.stop, 30)
            server = postgres.url
        scratch = f"kiln_bench_close_{secrets.token_hex(4)}"
        asyncio.run(_admin(server, f"CREATE DATABASE {scratch}"))
        exits.callback(lambda: asyncio.run(_admin(server, f"DROP DATABASE {scratch}")))
        base, _, query = server.partition("?")
        url = f"{base.rsplit('/', 1)[0]}/{scratch}" + (f"?{query}" if query else "")
        settings = Settings.from_env({"KILN_DATABASE_URL": url})
        migrate.upgrade(settings)
        asyncio.run(run(settings, args.customers, args.entries))


async def _admin(url: str, statement: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


if __name__ == "__main__":
    main()

"""How long each console page takes the server for a customer with history (issue 23): 100,000
invocation-log rows (over the last 24 hours, on one deployment) and 1,000 ledger entries (usage
charges with their usage events over 30 days, beside top-ups), in one run. Target: p50 at most
100 ms a page.

    .venv/bin/python bench/console.py [--requests 20] [--calls 100000] [--entries 1000]

Kiln runs as `kiln dev` with its defaults. The customer registers through the console's own
forms (the confirmation link read from the mail file) and deploys with a key made there; the
history is then written straight into PostgreSQL, as the invocation log writer and the billing
worker would have. Each page is asked for `--requests` times in turn after one warm-up; the
time is the client's, on loopback, from sending the request to the last byte of the page.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import signal
import statistics
import tempfile
import time
import tomllib
import uuid
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from pathlib import Path

import httpx
from warm_path import start_kiln

from kiln.devstack.ports import pick_port
from kiln.functions.package import package

TARGET_MS = 100.0
APP = """
import kiln

app = kiln.App("bench-console")


@app.function(min_replicas=0, max_replicas=1)
def work(n: int) -> int:
    return n * 2
"""


async def sign_up(client: httpx.AsyncClient, home: Path) -> None:
    """Register through the forms and follow the mailed confirmation link."""
    email = f"bench-{secrets.token_hex(3)}@example.com"
    page = await client.get("/console/register")
    csrf = _csrf(page.text)
    await client.post("/console/register", data={
        "csrf": csrf, "email": email, "password": "a bench password", "name": "Bench",
        "organisation": "Bench Co",
    })  # fmt: skip
    mail = message_from_bytes(next((home / "mail").glob(f"*-verify-{email}.eml")).read_bytes())
    body = mail.get_payload(decode=True)
    assert isinstance(body, bytes)
    token = re.search(r"token=([\w-]+)", body.decode())
    assert token is not None
    answer = await client.post("/console/verify", data={"csrf": csrf, "token": token.group(1)})
    assert answer.status_code == 303, answer.text


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None
    return found.group(1)


async def make_key(client: httpx.AsyncClient) -> str:
    page = await client.get("/console/keys")
    made = await client.post(
        "/console/keys", data={"csrf": _csrf(page.text), "action": "create", "name": "bench"}
    )
    key = re.search(r'<code id="new-key">([^<]+)</code>', made.text)
    assert key is not None
    return key.group(1)


async def write_history(database_url: str, key: str, url: str, calls: int, entries: int) -> None:
    """The customer's history, written as the platform's writers would have."""
    import sqlalchemy as sa

    from kiln.db.models import App, Function, Invocation, LedgerEntry, UsageEvent
    from kiln.db.session import create_engine
    from kiln.settings import Settings

    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}) as api:
        customer_id = uuid.UUID((await api.get("/v1/billing/balance")).json()["customer_id"])
    engine = create_engine(Settings.from_env({"KILN_DATABASE_URL": database_url}))
    now = datetime.now(UTC)
    try:
        async with engine.begin() as conn:
            function_id = (
                await conn.execute(
                    sa.select(Function.id)
                    .join(App, Function.app_id == App.id)
                    .where(App.customer_id == customer_id)
                )
            ).scalar_one()
            rows = [
                {
                    "customer_id": customer_id,
                    "function_id": function_id,
                    "kind": "sync",
                    "status": "failed" if i % 50 == 0 else "succeeded",
                    "error_code": "function_error" if i % 50 == 0 else None,
                    "started_at": now - timedelta(seconds=86_000 * i / calls),
                    "duration_ms": 5 + (i * 7919) % 400,
                    "execution_ms": 3,
                    "queue_wait_ms": 1,
                    "cold_start": i % 500 == 0,
                    "method": None,
                }
                for i in range(calls)
            ]
            for start in range(0, calls, 10_000):
                await conn.execute(sa.insert(Invocation), rows[start : start + 10_000])
            balance = 0
            for i in range(entries):
                at = now - timedelta(seconds=30 * 86_400 * i / entries)
                if i % 10 == 0:
                    balance += 50_000_000
                    await conn.execute(sa.insert(LedgerEntry).values(
                        customer_id=customer_id, kind="topup", amount_micros=50_000_000,
                        balance_after_micros=balance, created_at=at, description="bench top-up",
                    ))  # fmt: skip
                    continue
                event = f"bench:{secrets.token_hex(8)}"
                await conn.execute(sa.insert(UsageEvent).values(
                    id=event, replica_id=uuid.uuid4(), customer_id=customer_id,
                    function_id=function_id, gpu_type="L4", gpu_count=1,
                    period_start=at - timedelta(seconds=5), period_end=at, duration_ms=5_000,
                    calls=3,
                ))  # fmt: skip
                balance -= 1_000
                await conn.execute(sa.insert(LedgerEntry).values(
                    customer_id=customer_id, kind="usage", amount_micros=-1_000,
                    balance_after_micros=balance, usage_event_id=event, created_at=at,
                ))  # fmt: skip
            for table in ("invocations", "ledger_entries", "usage_events"):
                await conn.execute(sa.text(f"ANALYZE {table}"))
    finally:
        await engine.dispose()


async def measure(
    client: httpx.AsyncClient, paths: list[str], requests: int
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {p: [] for p in paths}
    for path in paths:
        assert (await client.get(path)).status_code == 200, path  # warm-up
    for _ in range(requests):
        for path in paths:
            started = time.perf_counter()
            answer = await client.get(path)
            times[path].append((time.perf_counter() - started) * 1000)
            assert answer.status_code == 200, (path, answer.status_code)
    return times


def table(times: dict[str, list[float]]) -> None:
    print(
        f"\n{'page':<42} {'p50 ms':>8} {'p90 ms':>8} {'max ms':>8}  target p50 <= {TARGET_MS:g} ms"
    )
    for path, values in times.items():
        ordered = sorted(values)
        p50 = statistics.median(ordered)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        verdict = "met" if p50 <= TARGET_MS else "MISSED"
        print(f"{path:<42} {p50:>8.1f} {p90:>8.1f} {ordered[-1]:>8.1f}  {verdict}")


async def run(args: argparse.Namespace, work: Path) -> None:
    home = work / "kiln"
    home.mkdir(mode=0o700)
    port = pick_port([], set())
    proc, _ = start_kiln(home, port)
    url = f"http://127.0.0.1:{port}"
    try:
        database_url = tomllib.loads((home / "config.toml").read_text())["services"]["database_url"]
        async with httpx.AsyncClient(base_url=url, headers={"Origin": url}, timeout=60) as client:
            await sign_up(client, home)
            key = await make_key(client)
            (work / "bench_app.py").write_text(APP)
            async with httpx.AsyncClient(
                base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60
            ) as api:
                deployed = await api.post(
                    "/v1/apps", json=package(work / "bench_app.py").deploy_body()
                )
                assert deployed.status_code in (200, 201), deployed.text
            started = time.perf_counter()
            await write_history(database_url, key, url, args.calls, args.entries)
            print(f"history: {args.calls} invocation-log rows and {args.entries} ledger entries "
                  f"written in {time.perf_counter() - started:.1f} s")  # fmt: skip
            paths = [
                "/console/", "/console/deployments", "/console/deployments/bench-console/work",
                "/console/catalog", "/console/billing", "/console/billing/transactions.csv",
                "/console/keys", "/console/members",
            ]  # fmt: skip
            table(await measure(client, paths, args.requests))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--entries", type=int, default=1_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-console-") as folder:
        asyncio.run(run(args, Path(folder)))


if __name__ == "__main__":
    main()

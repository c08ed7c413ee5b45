"""Conservation of replica time (issue 8's acceptance test): replicas run a steady load while
replicas, the billing service and NATS itself are killed at random. Afterwards, for every
replica: the time billed covers its whole life (from its slot to its exit) and exceeds it by
at most 5 s per crash; the usage intervals chain without gaps or overlaps; each is charged once;
and Stripe's meter (the fake, deduplicating by identifier as Stripe does) holds exactly the
ledger's time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from eventually import eventually
from fakestripe import API_KEY, WEBHOOK_SECRET, FakeStripe
from sqlalchemy.ext.asyncio import AsyncEngine
from stack import Platform, extra_node, kill_nats, nats_env, running_platform, with_nats

from kiln.db.enums import LedgerKind
from kiln.db.models import LedgerEntry, UsageEvent
from kiln.db.session import create_engine
from kiln.devstack.nats import EmbeddedNats
from kiln.devstack.ports import pick_port
from kiln.functions.package import package
from kiln.invoker.agent import NodeAgent
from kiln.settings import Settings
from kiln.wire import StartReplica

pytestmark = pytest.mark.integration

CHAOS_S = 45.0
SLACK_S = 0.05  # a final report the node agent missed ends a few ms before the exit

APP = """
import time

import kiln

app = kiln.App("conserved")


@app.function(gpu="A10G", concurrency=2, max_replicas=3, idle_timeout=3, timeout=30)
def work(ms: int) -> int:
    time.sleep(ms / 1000)
    return ms
"""


@dataclass
class Truth:
    """What really happened to each replica, as its node agent saw it."""

    since: dict[str, float] = field(default_factory=dict)
    exited: dict[str, float] = field(default_factory=dict)
    crashes: dict[str, int] = field(default_factory=dict)  # kills of it, and NATS outages

    def watch(self, agent: NodeAgent) -> None:
        start, stopped = agent.usage.start, agent.usage.stopped

        def starting(launch: StartReplica) -> None:
            self.since[launch.replica_id] = launch.received_at
            start(launch)

        def stopping(replica_id: str, at: float) -> None:
            self.exited[replica_id] = at
            stopped(replica_id, at)

        agent.usage.start = starting  # type: ignore[method-assign]
        agent.usage.stopped = stopping  # type: ignore[method-assign]


class BillingProcess:
    """`python -m kiln.billing`, killed and started again by the chaos."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.env = {
            "PATH": os.environ.get("PATH", ""), "HOME": str(settings.home),
            "KILN_ENV": "test", "KILN_HOME": str(settings.home),
            "KILN_NAMESPACE": settings.namespace,
            **nats_env(settings),
            # The usage reports' MAC key: the billing service charges only what agents signed.
            "KILN_SNAPSHOT_SIGNING_KEY": str(settings.snapshot_signing_key),
            "KILN_DATABASE_URL": str(settings.database_url),
            "KILN_STRIPE_API_KEY": API_KEY,
            "KILN_STRIPE_API_BASE": str(settings.stripe_api_base),
            "KILN_METRICS_PORT": str(pick_port([], set())),
        }  # fmt: skip
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kiln.billing"], env=self.env, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


async def load(platform: Platform, key: str, stop: asyncio.Event, seed: int) -> None:
    """Calls of 50-400 ms from three clients, with pauses long enough for replicas to idle
    out; failures (NATS is down, a replica was killed) are expected and ignored."""
    rng = random.Random(seed)

    async def client() -> None:
        async with httpx.AsyncClient(base_url=platform.url, timeout=40,
                                     headers={"Authorization": f"Bearer {key}"}) as c:  # fmt: skip
            while not stop.is_set():
                if rng.random() < 0.05:
                    await asyncio.sleep(rng.uniform(3, 6))
                with contextlib.suppress(httpx.HTTPError):
                    await c.post("/v1/run/conserved/work", json={"ms": rng.randint(50, 400)})

    await asyncio.gather(*(client() for _ in range(3)))


async def test_every_replica_second_is_billed_once_through_kills_of_replicas_billing_and_nats(
    settings: Settings,
    own_nats: EmbeddedNats,
    stripe_fake: FakeStripe,
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("KILN_TEST_CHAOS_SEED", random.randrange(10**6)))
    print(f"chaos seed {seed} (KILN_TEST_CHAOS_SEED={seed} replays it)")
    rng = random.Random(seed)
    paying = with_nats(settings, own_nats).replace(
        stripe_api_key=API_KEY, stripe_api_base=stripe_fake.url,
        stripe_webhook_secret=WEBHOOK_SECRET,
    )  # fmt: skip
    truth = Truth()
    billing = BillingProcess(paying.replace(home=tmp_path), tmp_path / "billing.log")
    billing.start()
    engine = create_engine(paying, application_name="kiln-test")
    try:
        async with (
            running_platform(paying, tmp_path / "home", billing=False) as platform,
            extra_node(platform, tmp_path / "gpu", "gpu-node", {"A10G": 3}) as node,
        ):
            truth.watch(node.agent)
            async with platform.client() as operator:
                customer = (
                    await operator.post(
                        "/v1/customers", json={"name": "Conserved", "tier": "enterprise"}
                    )
                ).json()
                key = (await operator.post("/v1/keys", json={
                    "kind": "account", "customer_id": customer["id"]})).json()["key"]  # fmt: skip
            app_file = tmp_path / "conserved.py"
            app_file.write_text(APP)
            async with platform.client() as c:
                c.headers["Authorization"] = f"Bearer {key}"
                assert (await c.post("/v1/apps", json=package(app_file).deploy_body())).is_success

            stop = asyncio.Event()
            loading = asyncio.create_task(load(platform, key, stop, seed))
            kills = {"replica": 0, "billing": 0, "nats": 0}
            deadline = time.monotonic() + CHAOS_S
            # Each kind of kill at least once, in a seeded order; then at random.
            first = rng.sample(["replica", "billing", "nats"], 3)
            while time.monotonic() < deadline:
                await asyncio.sleep(rng.uniform(2.0, 5.0))
                unmet = [kind for kind in first if not kills[kind]]
                what = unmet[0] if unmet else rng.choice(["replica", "replica", "billing", "nats"])
                if what == "replica" and node.agent.replicas:
                    victim = rng.choice(list(node.agent.replicas.values()))
                    truth.crashes[victim.launch.replica_id] = (
                        truth.crashes.get(victim.launch.replica_id, 0) + 1
                    )
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(victim.process.pid, signal.SIGKILL)
                elif what == "billing":
                    billing.kill()
                    await asyncio.sleep(rng.uniform(0.2, 2.0))
                    billing.start()
                elif what == "nats":
                    for replica_id in node.agent.replicas:  # an outage may cut any interval
                        truth.crashes[replica_id] = truth.crashes.get(replica_id, 0) + 1
                    await asyncio.to_thread(kill_nats, own_nats)
                    await asyncio.sleep(rng.uniform(0.2, 1.5))
                    own_nats.start(30)  # from the main thread (its parent-death signal); brief
                else:
                    continue
                kills[what] += 1
            stop.set()
            await asyncio.wait_for(loading, 60)
        # The node agent drained its replicas on the way out: every replica has exited.
        print(f"kills: {kills}; replicas: {len(truth.since)}")
        assert all(kills.values()), kills
        assert set(truth.exited) == set(truth.since)

        # The ledger catches up (a killed worker's reports come again after the ack wait).
        events = await eventually(lambda: _converged(engine, truth), within_s=90)
        for replica_id, mine in events.items():
            since, exited = truth.since[replica_id], truth.exited[replica_id]
            assert mine[0].period_start.timestamp() == pytest.approx(since, abs=1e-3)
            for earlier, later in itertools.pairwise(mine):
                assert later.period_start == earlier.period_end, (replica_id, mine)
            billed = sum(e.duration_ms for e in mine) / 1000
            true = exited - since
            crashes = truth.crashes.get(replica_id, 0)
            assert true - SLACK_S <= billed <= true + 5 * crashes + SLACK_S, (replica_id, mine)

        # Zero duplicate charges: one ledger entry per interval, at its price.
        ids = [e.id for mine in events.values() for e in mine]
        async with engine.connect() as conn:
            charged = (await conn.execute(
                sa.select(LedgerEntry.usage_event_id, LedgerEntry.amount_micros).where(
                    LedgerEntry.kind == LedgerKind.USAGE,
                    LedgerEntry.customer_id == uuid.UUID(customer["id"])))).all()  # fmt: skip
        assert sorted(str(i) for i, _ in charged) == sorted(ids)

        # Stripe's meter (deduplicated by identifier) holds the ledger's time to the millisecond.
        # (An interval of 0 ms has nothing to meter.)
        durations = {e.id: e.duration_ms for mine in events.values() for e in mine if e.duration_ms}
        await eventually(lambda: set(durations) <= set(stripe_fake.meter_events), within_s=60)
        mine_metered = {
            i: int(m["payload"]["value"]) for i, m in stripe_fake.meter_events.items()
            if i.rsplit(":", 1)[0] in truth.since
        }  # fmt: skip
        assert mine_metered == durations
        print(f"billed {sum(durations.values()) / 1000:.1f} s in {len(durations)} intervals; "
              f"Stripe got {stripe_fake.meter_posts} meter posts for them")  # fmt: skip
    finally:
        billing.stop()
        await engine.dispose()


async def _converged(engine: AsyncEngine, truth: Truth) -> dict[str, list[Any]]:
    """Each replica's intervals, once they run without a gap from its start to its exit: a
    check for `eventually`. (A report a killed worker held comes again only after the ack
    wait, so the last interval can be in before an earlier one.)"""
    async with engine.connect() as conn:
        rows = (await conn.execute(
            sa.select(*UsageEvent.__table__.c).where(UsageEvent.replica_id.in_(
                [uuid.UUID(r) for r in truth.since])).order_by(UsageEvent.period_start)
        )).all()  # fmt: skip
    events: dict[str, list[Any]] = {r: [] for r in truth.since}
    for row in rows:
        events[str(row.replica_id)].append(row)
    short = [
        r for r, mine in events.items()
        if not mine or mine[0].period_start.timestamp() > truth.since[r] + 1e-3
        or any(b.period_start != a.period_end for a, b in itertools.pairwise(mine))
        or mine[-1].period_end.timestamp() < truth.exited[r] - SLACK_S
    ]  # fmt: skip
    assert not short, {r: events[r] for r in short}
    return events

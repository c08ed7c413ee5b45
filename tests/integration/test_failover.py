"""Two schedulers on the real stack: one acts, and when it dies the other takes over within
about a lease, adopts the replicas it finds instead of starting them again, and goes on
scaling (issue 5: leader election)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import nats
import pytest
from eventually import eventually
from stack import Platform

from kiln._nats import connect_options
from kiln.db.session import create_engine, session_factory
from kiln.scheduler.scheduler import Scheduler

LEASE_S = 2.0
pytestmark = [pytest.mark.integration, pytest.mark.without_scheduler(lease_s=LEASE_S)]
STEADY = "failover/steady"

APP = """
import kiln

app = kiln.App("failover")


@app.function(min_replicas=1, idle_timeout=60)
def steady() -> str:
    return "steady"


@app.function(idle_timeout=60)
def later() -> str:
    return "later"
"""


@asynccontextmanager
async def scheduler(platform: Platform) -> AsyncIterator[tuple[Scheduler, Callable[[], None]]]:
    """A scheduler with its own connections, and a way to kill it: its task is cancelled and
    its connection dropped without giving the lease up, as when its process dies."""
    settings = platform.settings
    nc = await nats.connect(**connect_options(settings))
    engine = create_engine(settings, application_name="kiln-test-scheduler")
    acting = Scheduler(
        nc, session_factory(engine), settings.namespace,
        lease_s=LEASE_S, signing_key=settings.snapshot_signing_key,
        stream_replicas=settings.stream_replicas,
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(acting.run(stop))

    async def no_goodbye() -> None:
        return None

    def kill() -> None:
        assert acting.leadership is not None
        acting.leadership._give_up = no_goodbye  # type: ignore[method-assign]
        task.cancel()

    try:
        yield acting, kill
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await nc.close()
        await engine.dispose()


async def test_a_standby_scheduler_takes_over_without_duplicating_replicas(
    platform: Platform, tmp_path: Path
) -> None:
    app_file = tmp_path / "failover.py"
    app_file.write_text(APP)
    async with scheduler(platform) as (first, kill_first):
        await eventually(lambda: first.acting, within_s=10)
        async with scheduler(platform) as (second, _):
            await platform.deploy(app_file)
            await eventually(lambda: platform.ready_replicas(STEADY), within_s=60)
            assert not second.acting
            [original] = await platform.replicas(STEADY)

            kill_first()
            await eventually(lambda: second.acting, within_s=2 * LEASE_S + 2)  # a takeover
            leading = second.metrics.registry.get_sample_value
            await eventually(lambda: leading("kiln_scheduler_leading"), within_s=3)
            # Several reconcile passes of the new leader: the replica is adopted, not doubled.
            for _ in range(16):
                assert [r["id"] for r in await platform.replicas(STEADY)] == [original["id"]]
                await asyncio.sleep(0.25)

            # And it scales: a function with no replica gets one for its first call.
            later = await platform.call("failover/later")
            assert later.status_code == 200, later.text
            assert later.json() == "later"
            answer = await platform.call(STEADY)
            assert answer.json() == "steady"

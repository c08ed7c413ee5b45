"""NATS goes away and comes back, under the whole platform in one process (`kiln dev`'s): after
a restart within a second or two, and after an outage longer than any retry limit of the
client libraries, the first sync call through the same router succeeds within the recovery
target; jobs accepted before the outage each run once, with their result."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import pytest
from kit import CHAOS_APP, RECOVERY_S, first_success, job_outcomes, spawn_jobs
from stack import Platform, kill_nats, running_platform, with_nats

from kiln.devstack.nats import EmbeddedNats
from kiln.settings import Settings

pytestmark = pytest.mark.integration

# Longer than nats-py's own retry budget used to be (60 attempts, 2 s apart, were two minutes;
# any outage past the 12 s that JetStream publishes are retried proves the point as well).
LONG_OUTAGE_S = 15.0


@pytest.fixture(scope="module", name="platform")
async def platform_on_own_nats(
    settings: Settings, own_nats: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    home = tmp_path_factory.mktemp("chaos-nats")
    async with running_platform(with_nats(settings, own_nats), home, stop_apps=True) as running:
        await running.deploy_source(tmp_path_factory.mktemp("app"), "chaos_app.py", CHAOS_APP)
        yield running


async def _outage(server: EmbeddedNats, seconds: float) -> None:
    await asyncio.to_thread(kill_nats, server)
    await asyncio.sleep(seconds)  # the outage itself: what the test is about
    server.start(30)  # from the main thread (its parent-death signal); returns once it answers


@pytest.mark.parametrize("outage", ["short", "long"])
async def test_calls_come_back_within_the_target_after_nats_restarts(
    platform: Platform, own_nats: EmbeddedNats, chaos: random.Random, outage: str
) -> None:
    await first_success(platform, "chaos/echo", {"x": 1}, within_s=120)
    jobs = await spawn_jobs(platform, chaos.randint(3, 8))
    seconds = chaos.uniform(0.5, 2.0) if outage == "short" else LONG_OUTAGE_S
    await asyncio.sleep(chaos.uniform(0, 0.5))  # somewhere in the jobs' runs
    await _outage(own_nats, seconds)
    back_at = time.monotonic()
    recovery, failures = await first_success(platform, "chaos/echo", {"x": 2}, within_s=30)
    print(f"NATS away {seconds:.1f} s: first call served {recovery:.2f} s after it was back "
          f"(failed before: {failures})")  # fmt: skip
    assert recovery <= RECOVERY_S, (recovery, failures)
    await job_outcomes(platform, jobs, within_s=60)
    assert time.monotonic() - back_at < 90

"""Scaling on the real stack: demand hints, live changes through PATCH and `kiln scale`, a burst
up to max_replicas and back to zero, and a function that cannot start (issue 5)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import sqlalchemy as sa
from eventually import eventually
from stack import Platform, error_of
from typer.testing import CliRunner, Result

from kiln.cli.main import app as cli
from kiln.db.models import Function, Replica
from kiln.db.session import create_engine
from kiln.errors import RemoteError

pytestmark = pytest.mark.integration


QUICK_IDLE = """
import kiln

app = kiln.App("quickidle")


@app.function(idle_timeout=1)
def ping() -> str:
    return "pong"
"""


async def test_a_function_whose_replica_just_drained_wakes_the_scheduler_again(
    platform: Platform, tmp_path: Path
) -> None:
    """A draining replica stops vouching for its function at once, so the next call after a
    scale to zero hints the scheduler instead of waiting for its periodic pass."""
    await platform.deploy_source(tmp_path, "quickidle.py", QUICK_IDLE)
    assert (await platform.call("quickidle/ping")).status_code == 200
    await eventually(lambda: platform.scaled_to_zero("quickidle/ping"), within_s=20)
    async with platform.demand_hints() as hints:
        assert (await platform.call("quickidle/ping")).status_code == 200
    assert hints
    # Both calls waited for a cold start: the time shows as waiting for capacity.
    async with platform.client() as client:
        metrics = (await client.get("/metrics")).text
    assert 'kiln_router_queue_wait_seconds_count{app="quickidle",function="ping"} 2.0' in metrics
    waited = float(
        metrics.split('kiln_router_queue_wait_seconds_sum{app="quickidle",function="ping"} ')[
            1
        ].split()[0]
    )
    assert waited > 0.05


CRASHING = """
import kiln

app = kiln.App("crashing")


@app.cls(startup_timeout=4)
class Broken:
    @kiln.enter()
    def load(self) -> None:
        raise RuntimeError("the model file is missing")

    @kiln.method()
    def run(self) -> str:
        return "never"
"""


async def test_a_function_that_cannot_start_shows_why_and_is_retried_with_backoff(
    platform: Platform, tmp_path: Path
) -> None:
    await platform.deploy_source(tmp_path, "crashing.py", CRASHING)
    response = await platform.call("crashing/Broken.run", json={})
    assert response.status_code == 504, response.text  # no replica ever took it
    async with platform.client() as client:
        function = (await client.get("/v1/functions/crashing/Broken")).json()
        listed = (await client.get("/v1/functions")).json()["functions"]
    assert "RuntimeError: the model file is missing" in function["last_error"]
    assert [f["last_error"] for f in listed if f["app"] == "crashing"] == [function["last_error"]]
    # Backoff, not a crash loop: a handful of attempts in those seconds, not dozens.
    engine = create_engine(platform.settings, application_name="kiln-test")
    try:
        async with engine.connect() as conn:
            attempts = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(Replica)
                .join(Function, Function.id == Replica.function_id)
                .where(Function.name == "Broken")
            )
    finally:
        await engine.dispose()
    assert attempts is not None
    assert 1 <= attempts <= 4
    # Stopped, so it does not go on failing under the later modules' platforms, which share
    # this database and namespace (and whose standbys its retries would take).
    async with platform.client() as client:
        stopped = await client.delete("/v1/apps/crashing")
    assert stopped.status_code in (200, 204), stopped.text


async def test_live_scaling_changes_apply_persist_and_refuse_contradictions(
    platform: Platform, tmp_path: Path
) -> None:
    app_file = await platform.deploy_source(tmp_path, "scaled.py", SCALED)
    path = "/v1/functions/scaled/work"
    async with platform.client() as client:
        refused = await client.patch(path, json={"min_replicas": 5, "max_replicas": 2})
        assert refused.status_code == 400, refused.text
        assert error_of(refused)["message"] == (
            "min_replicas=5 is above max_replicas=2: raise max_replicas or lower min_replicas"
        )
        too_busy = await client.patch(path, json={"target_concurrency": 9})
        assert (
            error_of(too_busy)["message"] == "target_concurrency=9 must be from 1 to concurrency=4"
        )
        unchanged = (await client.get(path)).json()
        assert (unchanged["min_replicas"], unchanged["max_replicas"]) == (0, 3)
        assert unchanged["overridden"] == []

        changed = await client.patch(path, json={"min_replicas": 1, "idle_timeout": 30})
        assert changed.status_code == 200, changed.text
        view = changed.json()
        assert (view["min_replicas"], view["idle_timeout"]) == (1, 30)
        assert sorted(view["overridden"]) == ["idle_timeout_s", "min_replicas"]

    # Live: the scheduler starts the minimum without any call.
    await eventually(lambda: platform.ready_replicas("scaled/work"), within_s=30)
    async with platform.client() as client:
        metrics = (await client.get("/metrics")).text
    assert 'kiln_scheduler_desired_replicas{app="scaled",function="work"} 1.0' in metrics
    assert 'kiln_scheduler_scale_decisions_total{direction="up"}' in metrics
    assert "kiln_scheduler_leading 1.0" in metrics

    # A redeploy of changed code keeps the operator's settings, and says so.
    app_file.write_text(SCALED.replace('"done"', '"done again"'))
    kept = await platform.deploy(app_file)
    assert kept["kept_settings"] == {"work": {"min_replicas": 1, "idle_timeout_s": 30}}
    async with platform.client() as client:
        after = (await client.get(path)).json()
        assert (after["min_replicas"], after["idle_timeout"], after["max_replicas"]) == (1, 30, 3)
        over_cap = await client.patch(path, json={"max_replicas": 1001})
        assert error_of(over_cap)["message"] == (
            "max_replicas=1001 is not valid: this platform allows at most 1000 replicas per "
            "function"
        )

    # A value the developer newly writes in the decorator replaces the operator's; the others
    # stay.
    app_file.write_text(SCALED.replace("concurrency=4)", "concurrency=4, idle_timeout=60)"))
    edited = await platform.deploy(app_file)
    assert edited["kept_settings"] == {"work": {"min_replicas": 1}}
    async with platform.client() as client:
        after = (await client.get(path)).json()
    assert (after["min_replicas"], after["idle_timeout"], after["overridden"]) == (
        1,
        60,
        ["min_replicas"],
    )

    # Asked to, a deploy puts every setting back to the code's.
    reset = await platform.deploy(app_file, reset_scaling=True)
    assert reset["kept_settings"] == {}
    async with platform.client() as client:
        after = (await client.get(path)).json()
    assert (after["min_replicas"], after["idle_timeout"], after["overridden"]) == (0, 60, [])


SCALED = """
import kiln

app = kiln.App("scaled")


@app.function(max_replicas=3, concurrency=4)
def work() -> str:
    return "done"
"""


async def test_kiln_scale_changes_a_function_and_explains_what_it_refuses(
    platform: Platform, tmp_path: Path
) -> None:
    await platform.deploy_source(tmp_path, "scaled2.py", SCALED.replace('"scaled"', '"scaled2"'))
    env = {"KILN_URL": platform.url, "KILN_API_KEY": platform.key, "KILN_HOME": str(tmp_path)}

    def kiln(*args: str) -> Result:
        # In a thread: the CLI's client blocks, and the platform serves on this event loop.
        return CliRunner().invoke(cli, list(args), env=env)

    done = await asyncio.to_thread(kiln, "scale", "scaled2/work", "--max", "2", "--buffer", "1")
    assert done.exit_code == 0, done.output
    assert done.output.startswith("scaled2/work: min 0, max 2, buffer 1, idle timeout 300s")
    refused = await asyncio.to_thread(kiln, "scale", "scaled2/work", "--min", "3")
    # `kiln` (kiln.cli.main.main) prints this error as one line and exits 1.
    assert isinstance(refused.exception, RemoteError)
    assert "min_replicas=3 is above max_replicas=2" in str(refused.exception)
    nothing = await asyncio.to_thread(kiln, "scale", "scaled2/work")
    assert nothing.exit_code == 2
    assert "nothing to change" in nothing.output


BURSTY = """
import time

import kiln

app = kiln.App("bursty")


@app.function(max_replicas=3, idle_timeout=2)
def slow(i: int) -> int:
    time.sleep(0.5)
    return i
"""


async def test_a_burst_scales_to_max_replicas_and_drains_back_with_no_failures(
    platform: Platform, tmp_path: Path
) -> None:
    await platform.deploy_source(tmp_path, "bursty.py", BURSTY)
    seen: set[str] = set()
    most = 0
    burst_over = asyncio.Event()

    async def watch() -> None:
        nonlocal most
        while not burst_over.is_set():
            live = await platform.replicas("bursty/slow")
            seen.update(str(r["id"]) for r in live)
            most = max(most, len(live))
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(
            *(platform.call("bursty/slow", json={"i": i}) for i in range(24))
        )
    finally:
        burst_over.set()
        await watcher
    assert [r.status_code for r in results] == [200] * 24
    assert sorted(r.json() for r in results) == list(range(24))
    assert most == 3  # up to max_replicas, never beyond
    assert len(seen) == 3
    # Idle for idle_timeout (2 s): back to min_replicas (0), nothing left running.
    await eventually(lambda: platform.scaled_to_zero("bursty/slow"), within_s=20)

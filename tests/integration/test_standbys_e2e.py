"""Standbys that imported what each function needs, learned from its snapshot, with nothing
configured: a function whose snapshot needs a library outside the defaults cold-starts without
importing it after assignment, and bursts of cold starts (several functions, several replicas
of one function) each find such a standby."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats
import pytest
import sqlalchemy as sa
from nats.aio.msg import Msg
from stack import Platform, next_node_beat

from kiln._nats import connect_options
from kiln._proc import can_raise_priority, raise_priority
from kiln.db.models import App, Function
from kiln.db.session import create_engine
from kiln.functions.package import package
from kiln.invoker.flavours import BASE
from kiln.invoker.standby_pool import StandbyPool
from kiln.snapshots.imports import expand
from kiln.wire import ColdStartReport, Subjects, affinity_id, decode

pytestmark = pytest.mark.integration


CLASS = """
import time

import kiln

app = kiln.App("{app}")


@app.cls(idle_timeout=1, max_replicas=3)
class Held:
    @kiln.enter(snap=True)
    def build(self) -> None:
        {build}

    @kiln.method()
    def show(self, hold_s: float = 0.0) -> str:
        time.sleep(hold_s)
        return str(self.value)
"""
SYMPY = """import sympy

        x = sympy.Symbol("x")
        self.value = sympy.expand((x + 1) ** 3)"""
FRACTIONS = """import fractions

        self.value = fractions.Fraction(1, 3) + fractions.Fraction(1, 6)"""
DECIMAL = """import decimal

        self.value = decimal.Decimal("1.10") + decimal.Decimal("2.20")"""


class ColdStarts:
    """Every replica's cold-start report (not the follow-ups after first calls) and every
    replica's exit, as they come."""

    def __init__(self) -> None:
        self.reports: list[ColdStartReport] = []
        self.exited: set[str] = set()
        self.arrived = asyncio.Condition()

    async def note(self, msg: Msg) -> None:
        report = decode(ColdStartReport, msg.data)
        if "first_call" not in report.phases:
            async with self.arrived:
                self.reports.append(report)
                self.arrived.notify_all()

    async def note_exit(self, msg: Msg) -> None:
        async with self.arrived:
            self.exited.add(json.loads(msg.data)["replica_id"])
            self.arrived.notify_all()

    async def scaled_to_zero(self) -> None:
        """Until every replica that reported has exited (their idle timeout is 1 s). A replica
        reports its cold start off the path to its first call, so wait for the reports first:
        one still on its way is not waited for."""
        async with self.arrived:
            await asyncio.wait_for(
                self.arrived.wait_for(lambda: {r.replica_id for r in self.reports} <= self.exited),
                60,
            )

    async def of(self, function_id: uuid.UUID, count: int, after: int = 0) -> list[ColdStartReport]:
        """The first `count` reports of the function after the first `after` of them."""

        def found() -> list[ColdStartReport]:
            return [r for r in self.reports if r.function_id == str(function_id)][after:]

        async with self.arrived:
            try:
                await asyncio.wait_for(self.arrived.wait_for(lambda: len(found()) >= count), 120)
            except TimeoutError:
                shown = [(r.replica_id[:8], r.origin, r.process) for r in found()]
                raise AssertionError(f"{count} cold starts expected, these came: {shown}") from None
        return found()[:count]


@asynccontextmanager
async def cold_starts(platform: Platform) -> AsyncIterator[ColdStarts]:
    seen = ColdStarts()
    nc = await nats.connect(**connect_options(platform.settings))
    try:
        subjects = Subjects(platform.settings.namespace)
        await nc.subscribe(subjects.all_cold_starts, cb=seen.note)
        await nc.subscribe(subjects.replica_events, cb=seen.note_exit)
        await nc.flush()
        yield seen
    finally:
        await nc.close()


async def deploy(platform: Platform, tmp_path: Path, app: str, build: str) -> tuple[uuid.UUID, str]:
    """Deploy the class `app/Held` building its state with `build`: its function id and
    affinity id."""
    app_file = tmp_path / f"{app}.py"
    app_file.write_text(CLASS.format(app=app, build=build))
    await platform.deploy(app_file)
    engine = create_engine(platform.settings, application_name="kiln-test")
    try:
        async with engine.connect() as conn:
            function_id = await conn.scalar(
                sa.select(Function.id)
                .join(App, App.id == Function.app_id)
                .where(App.name == app, Function.name == "Held")
            )
    finally:
        await engine.dispose()
    assert function_id is not None
    return function_id, affinity_id(package(app_file).digest, f"{app}/Held")


async def call(platform: Platform, app: str, hold_s: float = 0.0) -> str:
    response = await platform.call(f"{app}/Held.show", json={"hold_s": hold_s})
    assert response.status_code == 200, response.text
    result: str = response.json()
    return result


async def test_a_library_the_snapshot_needs_is_imported_before_the_cold_start(
    platform: Platform, tmp_path: Path
) -> None:
    function_id, affinity = await deploy(platform, tmp_path, "symbolic", SYMPY)
    async with cold_starts(platform) as seen:
        assert await call(platform, "symbolic") == "x**3 + 3*x**2 + 3*x + 1"
        [baked] = await seen.of(function_id, 1)
        assert baked.origin == "baked"
        # Nothing told the platform about sympy: the first replica had to import it.
        assert "sympy" in expand(baked.late_imports)

        # The sealed snapshot says what the function needs; the node keeps a standby for it.
        root = platform.settings.home / "snapshots"
        manifests = [json.loads(p.read_text()) for p in root.glob("*/manifest.json")]
        [manifest] = [m for m in manifests if m["function"] == "symbolic/Held"]
        assert "sympy.core.symbol" in expand(manifest["imports"])
        await seen.scaled_to_zero()
        await next_node_beat(platform, lambda beat: affinity in beat.ready_for, timeout_s=120)

        assert await call(platform, "symbolic") == "x**3 + 3*x**2 + 3*x + 1"
        [restored] = await seen.of(function_id, 1, after=1)
    assert restored.origin == "snapshot"
    assert restored.process == "standby"
    assert restored.late_imports == []  # sympy was imported before the assignment


async def test_a_burst_of_cold_starts_of_several_functions_each_gets_a_standby(
    platform: Platform, tmp_path: Path
) -> None:
    apps = {"algebra": SYMPY, "ratios": FRACTIONS, "money": DECIMAL}
    deployed = {app: await deploy(platform, tmp_path, app, build) for app, build in apps.items()}
    async with cold_starts(platform) as seen:
        for app in apps:  # each bakes its snapshot and teaches the node what it needs
            await call(platform, app)
        for function_id, _ in deployed.values():
            await seen.of(function_id, 1)  # reported: the wait for its exit includes it
        await seen.scaled_to_zero()
        affinities = [affinity for _, affinity in deployed.values()]
        # sympy imports fractions, which imports decimal: the node keeps one flavour, three
        # deep, for the three. Its first standby puts all three in ready_for; the burst needs
        # all three standbys (beside the generic ones).
        wanted = platform.settings.standby_processes + len(apps)
        await next_node_beat(
            platform,
            lambda beat: (
                all(a in beat.ready_for for a in affinities)
                and beat.standbys.get("none", 0) >= wanted
            ),
            timeout_s=180,
        )
        results = await asyncio.gather(*(call(platform, app) for app in apps))
        assert results == ["x**3 + 3*x**2 + 3*x + 1", "1/2", "3.30"]
        for app, (function_id, _) in deployed.items():
            [report] = await seen.of(function_id, 1, after=1)
            assert (report.origin, report.process, report.late_imports) == (
                "snapshot", "standby", []
            ), (app, seen.reports)  # fmt: skip


# Its waits add up past the suite's 120 s on two busy cores: two bursts, two scale-downs and
# three standbys refilled at nice 10 in between (each wait keeps its own limit).
@pytest.mark.timeout(300)
async def test_a_burst_of_replicas_of_one_function_deepens_its_standbys(
    platform: Platform, tmp_path: Path
) -> None:
    function_id, affinity = await deploy(platform, tmp_path, "fanout", FRACTIONS)
    async with cold_starts(platform) as seen:
        await call(platform, "fanout")  # bakes
        await seen.of(function_id, 1)  # reported: the wait for its exit includes it
        await seen.scaled_to_zero()
        # Three calls held for a while at once: three replicas (concurrency 1, max 3).
        await asyncio.gather(*(call(platform, "fanout", hold_s=2.0) for _ in range(3)))
        first_burst = await seen.of(function_id, 3, after=1)
        await seen.scaled_to_zero()
        # The node saw three at once: it keeps three standbys of the flavour from now on.
        await next_node_beat(
            platform, lambda beat: beat.ready_for.get(affinity, 0) >= 3, timeout_s=180
        )
        await asyncio.gather(*(call(platform, "fanout", hold_s=2.0) for _ in range(3)))
        second_burst = await seen.of(function_id, 3, after=4)
    assert len({r.replica_id for r in first_burst + second_burst}) == 6
    assert [(r.origin, r.process) for r in second_burst] == [("snapshot", "standby")] * 3


def _nice_of_threads(pid: int) -> set[int]:
    """Each thread's nice value (field 19 of its stat line)."""
    values = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rpartition(")")[2].split()
        values.add(int(fields[16]))
    return values


@pytest.mark.skipif(not can_raise_priority(), reason="needs root (or RLIMIT_NICE) to renice")
async def test_a_standby_waits_at_a_low_priority_and_gets_it_back_when_assigned(
    tmp_path: Path,
) -> None:
    """A refill importing torch must not take the CPU from a cold start restoring beside it;
    the replica it becomes runs at the usual priority, in every thread."""
    standbys = StandbyPool(lambda device, flavour: {}, tmp_path, memory_budget=2**40)
    standby = await standbys._spawn("", BASE)
    try:
        pid = standby.process.pid
        assert standby.niced
        assert _nice_of_threads(pid) == {10}
        raise_priority(pid)
        assert _nice_of_threads(pid) == {0}
    finally:
        standby.process.kill()
        await standby.process.wait()

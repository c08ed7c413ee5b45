"""PostgreSQL restarts under the platform: warm calls keep working from the router's caches
while it is away, nothing accepted is lost (the invocation log's rows and the usage written
once it is back), and calls that need it serve again within the recovery target."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import sqlalchemy as sa
from eventually import eventually
from kit import CHAOS_APP, RECOVERY_S, first_success
from stack import Platform, own_server, running_platform

from kiln.db.models import App, Function, Invocation, UsageEvent
from kiln.db.session import create_engine
from kiln.devstack.postgres import EmbeddedPostgres
from kiln.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def own_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL server of this module's own, since the test restarts it."""
    with own_server(EmbeddedPostgres, tmp_path_factory.mktemp("postgres"), start_s=60) as server:
        yield server


@pytest.fixture(scope="module", name="platform")
async def platform_on_own_postgres(
    settings: Settings, own_postgres: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    home = tmp_path_factory.mktemp("chaos-postgres")
    on_own = settings.replace(database_url=own_postgres.url)
    async with running_platform(on_own, home, stop_apps=True) as running:
        await running.deploy_source(tmp_path_factory.mktemp("app"), "chaos_app.py", CHAOS_APP)
        yield running


async def counts(platform: Platform) -> tuple[int, int]:
    """Rows of the chaos app's calls in the invocation log, and its usage events."""
    engine = create_engine(platform.settings, application_name="kiln-test")
    try:
        async with engine.connect() as conn:
            ours = sa.select(Function.id).join(App).where(App.name == "chaos")
            calls = await conn.scalar(
                sa.select(sa.func.count()).where(Invocation.function_id.in_(ours))
            )
            usage = await conn.scalar(
                sa.select(sa.func.count()).where(UsageEvent.function_id.in_(ours))
            )
    finally:
        await engine.dispose()
    return int(calls or 0), int(usage or 0)


async def test_warm_calls_go_on_while_postgres_restarts_and_nothing_is_lost(
    platform: Platform, own_postgres: EmbeddedPostgres, chaos: random.Random
) -> None:
    await first_success(platform, "chaos/echo", {"x": 0}, within_s=120)
    logged_before, usage_before = await counts(platform)
    own_postgres.stop(15)  # a restart: PostgreSQL shuts down, and is away for a while
    away_until = time.monotonic() + chaos.uniform(2.0, 5.0)
    during = 0
    async with platform.client() as client:
        while time.monotonic() < away_until:
            response = await client.post("/v1/run/chaos/echo", json={"x": during})
            assert response.status_code == 200, response.text
            assert response.json() == during
            during += 1
    own_postgres.start(60)  # from the main thread (its parent-death signal)
    recovery, _ = await first_success(platform, "chaos/echo", {"x": -1}, within_s=30)
    print(f"{during} warm calls served while PostgreSQL was away; the first after it: "
          f"{recovery:.2f} s")  # fmt: skip
    assert during > 10
    assert recovery <= RECOVERY_S

    # What happened meanwhile is written down once it is back: each call's row, and usage.
    async def written() -> bool:
        logged, usage = await counts(platform)
        assert logged >= logged_before + during + 1, (logged_before, during, logged)
        assert usage > usage_before, (usage_before, usage)
        return True

    await eventually(written, within_s=30, every_s=0.2)

"""Redis stops under the platform and comes back later: calls keep working throughout (rate
limits fall back to each router's own counts, API keys to PostgreSQL), and Redis is used again
once it is back."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from eventually import eventually
from kit import CHAOS_APP, first_success
from stack import Platform, own_server, running_platform

from kiln.devstack.redis import EmbeddedRedis
from kiln.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A Redis server of this module's own, since the test stops it."""
    with own_server(EmbeddedRedis, tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module", name="platform")
async def platform_on_own_redis(
    settings: Settings, own_redis: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    home = tmp_path_factory.mktemp("chaos-redis")
    async with running_platform(settings.replace(redis_url=own_redis.url), home) as running:
        await running.deploy_source(tmp_path_factory.mktemp("app"), "chaos_app.py", CHAOS_APP)
        yield running


async def rate_limit_fallbacks(platform: Platform) -> float:
    async with platform.client() as client:
        text = (await client.get("/metrics")).text
    line = next(x for x in text.splitlines() if x.startswith("kiln_router_rate_limit_fallback "))
    return float(line.split()[-1])


async def customer_key(platform: Platform) -> str:
    """A customer's key: its requests count against its tier's limits (the operator's do not)."""
    async with platform.client() as operator:
        customer = (
            await operator.post("/v1/customers", json={"name": "Chaos", "tier": "enterprise"})
        ).json()
        created = await operator.post(
            "/v1/keys", json={"kind": "account", "customer_id": customer["id"]}
        )
    key: str = created.json()["key"]
    return key


async def test_calls_go_on_while_redis_is_stopped_and_it_is_used_again_after(
    platform: Platform, own_redis: EmbeddedRedis, chaos: random.Random
) -> None:
    await first_success(platform, "chaos/echo", {"x": 0}, within_s=120)
    customer = Platform(platform.url, await customer_key(platform), platform.settings)
    assert await rate_limit_fallbacks(platform) == 0
    own_redis.stop(10)
    away_until = time.monotonic() + chaos.uniform(1.0, 3.0)
    served = 0
    async with platform.client() as client, customer.client() as limited:
        counted = await limited.get("/v1/apps")  # counted against the customer's limits
        assert counted.status_code == 200, counted.text
        while time.monotonic() < away_until:
            response = await client.post("/v1/run/chaos/echo", json={"x": served})
            assert response.status_code == 200, response.text
            served += 1
    assert served > 5
    assert await rate_limit_fallbacks(platform) == 1
    own_redis.start(30)  # from the main thread (its parent-death signal)
    recovery, _ = await first_success(platform, "chaos/echo", {"x": -1}, within_s=30)
    print(f"{served} calls served while Redis was away; the first after it: {recovery:.2f} s")
    async with customer.client() as limited:

        async def on_redis_again() -> bool:  # a counted request makes the limiter try Redis
            if await rate_limit_fallbacks(platform) == 0:
                return True
            if (response := await limited.get("/v1/apps")).status_code != 200:
                pytest.fail(response.text)
            return False

        await eventually(on_redis_again, within_s=30, what="the rate limiter back on Redis")

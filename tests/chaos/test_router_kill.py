"""One of two routers is SIGKILLed under load: the other keeps serving, and clients that retry
on the other router lose nothing. The second router is `python -m kiln.router`, as production
runs it; it also shows its health, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from eventually import eventually
from kit import CHAOS_APP, RETRYABLE
from stack import STOP_BOUND_S, Platform, Service, running_platform

from kiln.devstack.ports import pick_port
from kiln.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", name="platform")
async def platform_with_app(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    home = tmp_path_factory.mktemp("chaos-routers")
    async with running_platform(settings, home, stop_apps=True) as running:
        await running.deploy_source(tmp_path_factory.mktemp("app"), "chaos_app.py", CHAOS_APP)
        yield running


def second_router(platform: Platform, home: Path) -> tuple[Service, str]:
    settings = platform.settings
    port = pick_port([], set())
    service = Service.start(
        "kiln.router", settings, home, namespace=settings.namespace,
        KILN_PORT=str(port), KILN_REDIS_URL=str(settings.redis_url),
        KILN_API_KEY_PEPPER=str(settings.api_key_pepper),
        KILN_SNAPSHOT_SIGNING_KEY=str(settings.snapshot_signing_key),
    )  # fmt: skip
    return service, f"http://127.0.0.1:{port}"


async def ready(service: Service, url: str) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:

        async def readyz() -> httpx.Response:
            if service.process.poll() is not None:
                pytest.fail(service.log.read_text())
            try:
                response = await client.get("/readyz")
            except httpx.HTTPError as exc:
                raise AssertionError(f"{exc!r}\n{service.log.read_text()}") from None
            assert response.status_code == 200, service.log.read_text()
            return response

        response = await eventually(readyz, within_s=60, every_s=0.1)
        health = (await client.get("/healthz")).json()
    assert health == {"status": "ok", "problems": []}, health
    body: dict[str, object] = response.json()
    return body


async def test_killing_one_of_two_routers_loses_no_call_of_a_retrying_client(
    platform: Platform, chaos: random.Random, tmp_path: Path
) -> None:
    service, url = second_router(platform, tmp_path)
    try:
        assert await ready(service, url) == {"status": "ready", "problems": []}
        routers = [platform.url, url]
        stop = asyncio.Event()
        served: list[tuple[str, int]] = []  # (router, x)
        refused_by_survivor: list[str] = []

        async def client(number: int) -> None:
            headers = {"Authorization": f"Bearer {platform.key}"}
            async with httpx.AsyncClient(headers=headers, timeout=30) as http:
                for x in range(number * 100_000, number * 100_000 + 100_000):
                    if stop.is_set():
                        return
                    order = routers[:] if x % 2 else routers[::-1]
                    for attempt in range(10):
                        base = order[attempt % 2]
                        try:
                            response = await http.post(f"{base}/v1/run/chaos/echo", json={"x": x})
                        except httpx.HTTPError:
                            continue  # that router is gone: the other one
                        if response.status_code == 200:
                            assert response.json() == x
                            served.append((base, x))
                            break
                        assert response.status_code in RETRYABLE, response.text
                        if base == platform.url:
                            refused_by_survivor.append(response.text)
                    else:
                        raise AssertionError(f"call {x} was never served")

        clients = [asyncio.create_task(client(n)) for n in range(4)]
        await asyncio.sleep(chaos.uniform(1.0, 2.5))
        before = len(served)
        service.kill()
        killed_at = len(served)
        await asyncio.sleep(chaos.uniform(1.0, 2.5))
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), 60)
        after = served[killed_at:]
        print(f"served {before} calls before the kill, {len(after)} after it")
        assert before > 20
        assert {router for router, _ in served[:before]} == set(routers)
        assert len(after) > 20
        assert {router for router, _ in after[len(clients) :]} == {platform.url}
        assert not refused_by_survivor, refused_by_survivor[:3]
    finally:
        service.kill()


async def test_a_router_service_stops_cleanly_on_sigterm(
    platform: Platform, tmp_path: Path
) -> None:
    service, url = second_router(platform, tmp_path)
    try:
        await ready(service, url)
        took = await service.stop()
        assert took < STOP_BOUND_S
        log = service.log.read_text()
        assert "router stopped" in log
        assert "Traceback" not in log
    finally:
        service.kill()

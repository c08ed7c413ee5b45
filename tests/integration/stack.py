"""The whole platform in the test process (router, scheduler, node agent; real replica
processes, NATS, PostgreSQL and Redis), as the end-to-end tests use it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kiln.db import bootstrap, migrate
from kiln.devstack.ports import pick_port
from kiln.functions.package import package
from kiln.platform import serve_platform
from kiln.settings import Settings

BODY_LIMIT = 256 * 1024


@dataclass
class Platform:
    url: str
    key: str
    settings: Settings

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=httpx.Timeout(60.0),
        )

    async def deploy(self, file: Path) -> dict[str, Any]:
        async with self.client() as client:
            response = await client.post("/v1/apps", json=package(file).deploy_body())
        assert response.status_code in (200, 201), response.text
        result: dict[str, Any] = response.json()
        return result

    async def call(self, target: str, **kwargs: Any) -> httpx.Response:
        async with self.client() as client:
            return await client.post(f"/v1/run/{target}", **kwargs)

    async def replicas(self, target: str) -> list[dict[str, Any]]:
        """The live replicas of `APP/FN`, as the replicas route lists them."""
        async with self.client() as client:
            response = await client.get(f"/v1/functions/{target}/replicas")
        assert response.status_code == 200, response.text
        found: list[dict[str, Any]] = response.json()["replicas"]
        return found


@asynccontextmanager
async def running_platform(
    settings: Settings, home: Path, *, scheduler: bool = True
) -> AsyncIterator[Platform]:
    running = settings.replace(
        home=home,
        port=pick_port([], set()),
        node_id="e2e-node",
        node_gpus={"none": 16},
        max_request_bytes=BODY_LIMIT,
        shutdown_timeout_s=5.0,
    )
    await asyncio.to_thread(migrate.upgrade, running)
    key = await bootstrap.ensure_operator_key(running, None)
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.create_task(
        serve_platform(running, stop, on_ready=ready.set, scheduler=scheduler)
    )
    await asyncio.wait_for(ready.wait(), 30)
    try:
        yield Platform(f"http://127.0.0.1:{running.port}", key, running)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


@pytest.fixture(scope="module", name="platform")
async def platform_fixture(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    """A platform per test module (import this fixture into the module)."""
    async with running_platform(settings, tmp_path_factory.mktemp("platform-home")) as running:
        yield running

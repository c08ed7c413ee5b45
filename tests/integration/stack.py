"""The whole platform in the test process (router, scheduler, node agent; real replica
processes, NATS, PostgreSQL and Redis), as the end-to-end tests use it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import nats
import pytest
import sqlalchemy as sa
from eventually import eventually
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncEngine

from kiln._nats import connect_options
from kiln.db import bootstrap, migrate
from kiln.db.enums import NodeState
from kiln.db.models import Node
from kiln.devstack.nats import EmbeddedNats
from kiln.devstack.ports import pick_port
from kiln.devstack.service import EmbeddedService
from kiln.functions.package import package
from kiln.invoker.agent import NodeAgent
from kiln.platform import serve_platform
from kiln.settings import Settings
from kiln.wire import NodeHeartbeat, Subjects, decode

BODY_LIMIT = 256 * 1024
STOP_BOUND_S = 15.0


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

    async def deploy(self, file: Path, *, reset_scaling: bool = False) -> dict[str, Any]:
        body = package(file).deploy_body(reset_scaling=reset_scaling)
        async with self.client() as client:
            response = await client.post("/v1/apps", json=body)
        assert response.status_code in (200, 201), response.text
        result: dict[str, Any] = response.json()
        return result

    async def deploy_source(self, directory: Path, name: str, source: str) -> Path:
        """Write `source` as `directory/name` and deploy it; the file, for redeploys."""
        app_file = directory / name
        app_file.write_text(source)
        await self.deploy(app_file)
        return app_file

    async def call(self, target: str, **kwargs: Any) -> httpx.Response:
        async with self.client() as client:
            return await client.post(f"/v1/run/{target}", **kwargs)

    @asynccontextmanager
    async def demand_hints(self) -> AsyncIterator[list[str]]:
        """The subjects of the demand hints (the routers' wake-ups for the scheduler) sent
        while inside."""
        nc = await nats.connect(**connect_options(self.settings))
        seen: list[str] = []

        async def note(msg: Msg) -> None:
            seen.append(msg.subject)

        try:
            await nc.subscribe(Subjects(self.settings.namespace).all_demand, cb=note)
            await nc.flush()
            yield seen
            await nc.flush()
        finally:
            await nc.close()

    async def replicas(self, target: str) -> list[dict[str, Any]]:
        """The live replicas of `APP/FN`, as the replicas route lists them."""
        async with self.client() as client:
            response = await client.get(f"/v1/functions/{target}/replicas")
        assert response.status_code == 200, response.text
        found: list[dict[str, Any]] = response.json()["replicas"]
        return found

    async def ready_replicas(self, target: str) -> list[dict[str, Any]]:
        """The ready ones among `replicas(target)`."""
        return [r for r in await self.replicas(target) if r["state"] == "ready"]

    async def scaled_to_zero(self, target: str) -> bool:
        """Whether `APP/FN` has no live replica: a check for `eventually`."""
        live = await self.replicas(target)
        assert not live, f"{target} still has {[r['state'] for r in live]}"
        return True


async def next_node_beat(
    platform: Platform, matches: Callable[[NodeHeartbeat], bool], timeout_s: float = 10
) -> NodeHeartbeat:
    nc = await nats.connect(**connect_options(platform.settings))
    found: asyncio.Future[NodeHeartbeat] = asyncio.get_running_loop().create_future()

    async def seen(msg: Msg) -> None:
        beat = decode(NodeHeartbeat, msg.data)
        if matches(beat) and not found.done():
            found.set_result(beat)

    try:
        await nc.subscribe(Subjects(platform.settings.namespace).all_node_heartbeats, cb=seen)
        return await asyncio.wait_for(found, timeout_s)
    finally:
        await nc.close()


async def node_lost(engine: AsyncEngine, node_id: str) -> bool:
    """Whether the scheduler has recorded the node lost: a check for `eventually`."""
    async with engine.connect() as conn:
        state = await conn.scalar(sa.select(Node.state).where(Node.id == node_id))
    assert state == NodeState.LOST, f"{node_id} is {state}"
    return True


def error_of(response: httpx.Response) -> dict[str, str]:
    """The error body's fields; checks that its request id is the response header's."""
    error: dict[str, str] = response.json()["error"]
    assert error["request_id"] == response.headers["x-request-id"]
    return error


@dataclass
class ExtraNode:
    """Another node agent in the test process, standing for another host."""

    agent: NodeAgent
    nc: NATS
    task: asyncio.Task[None]

    async def kill(self) -> None:
        """Die as a host does: its connection drops without a word and its replica processes
        are killed, so the platform learns of it only from the heartbeats that stop."""
        await self.nc.close()
        for running in list(self.agent.replicas.values()):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(running.process.pid, signal.SIGKILL)
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@asynccontextmanager
async def extra_node(
    platform: Platform, home: Path, node_id: str, slots: dict[str, int]
) -> AsyncIterator[ExtraNode]:
    """A node agent with its own NATS connection offering `slots` (e.g. {"H100": 2}: simulated
    GPUs), no standbys; stopped (replicas drained) on exit unless killed."""
    settings = platform.settings.replace(
        home=home, node_id=node_id, node_gpus=slots, standby_processes=0
    )
    nc = await nats.connect(**connect_options(settings))
    agent = NodeAgent(settings, nc)
    stop = asyncio.Event()
    node = ExtraNode(agent, nc, asyncio.create_task(agent.run(stop)))
    try:
        yield node
    finally:
        if not node.task.done():
            stop.set()
            await asyncio.wait_for(node.task, 60)
        await nc.close()


@asynccontextmanager
async def running_platform(
    settings: Settings,
    home: Path,
    *,
    scheduler: bool = True,
    billing: bool = True,
    max_request_bytes: int = BODY_LIMIT,
    stop_apps: bool = False,
) -> AsyncIterator[Platform]:
    """With `stop_apps` (a module's platform), every app still deployed is stopped first."""
    running = settings.replace(
        home=home,
        port=pick_port([], set()),
        node_id="e2e-node",
        node_gpus={"none": 16},
        max_request_bytes=max_request_bytes,
        shutdown_timeout_s=5.0,
    )
    await asyncio.to_thread(migrate.upgrade, running)
    key = await bootstrap.ensure_operator_key(running, None)
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.create_task(
        serve_platform(running, stop, on_ready=ready.set, scheduler=scheduler, billing=billing)
    )
    await asyncio.wait_for(ready.wait(), 30)
    platform = Platform(f"http://127.0.0.1:{running.port}", key, running)
    try:
        yield platform
    finally:
        if stop_apps and not task.done():
            with contextlib.suppress(httpx.HTTPError, AssertionError):
                await _stop_every_app(platform)
        stop.set()
        await asyncio.wait_for(task, 60)


async def _stop_every_app(platform: Platform) -> None:
    """Every module's platform shares the session's database: apps a module leaves deployed
    would start (and fail, and retry) under the next module's platform, taking its node's
    slots, standbys and CPU. (Platforms a test starts itself keep theirs: the next platform
    the test starts finds them.)"""
    async with platform.client() as client:
        listed = await client.get("/v1/apps")
        assert listed.status_code == 200, listed.text
        for app in listed.json()["apps"]:
            if app["state"] == "active":
                await client.delete(f"/v1/apps/{app['name']}")


@dataclass
class Service:
    """`python -m MODULE` with the test session's settings and a metrics port of its own."""

    module: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @classmethod
    def start(
        cls,
        module: str,
        settings: Settings,
        home: Path,
        *,
        namespace: str | None = None,
        **env: str,
    ) -> Service:
        """By default in a namespace of its own (cleaned with the session's), so no other
        test's scheduler hears this node agent, nor this scheduler the platforms' nodes;
        `namespace` joins it to a platform's instead."""
        port = pick_port([], set())
        log = home / f"{module}.log"
        home.mkdir(parents=True, exist_ok=True)
        environ = {
            "PATH": os.environ.get("PATH", ""), "HOME": str(home), "KILN_ENV": "test",
            "KILN_HOME": str(home),
            "KILN_NAMESPACE": namespace or f"{settings.namespace}svc",
            **nats_env(settings),
            "KILN_DATABASE_URL": str(settings.database_url),
            "KILN_METRICS_PORT": str(port), "KILN_SHUTDOWN_TIMEOUT": "5",
            **env,
        }  # fmt: skip
        with log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", module], env=environ, stdout=out, stderr=subprocess.STDOUT
            )
        return cls(module, process, port, log)

    async def metrics(self) -> str:
        async with httpx.AsyncClient(timeout=5) as client:
            return (await client.get(f"http://127.0.0.1:{self.port}/metrics")).text

    async def wait_for(self, *wanted: str, within_s: float = 30) -> str:
        """The metrics text once it holds every string in `wanted`."""

        async def holds() -> str:
            if self.process.poll() is not None:
                pytest.fail(f"{self.module} exited:\n{self.log.read_text()}")
            try:
                text = await self.metrics()
            except httpx.HTTPError:
                text = ""
            assert all(w in text for w in wanted), f"no {[w for w in wanted if w not in text]}"
            return text

        return await eventually(
            holds, within_s=within_s, every_s=0.1, what=f"{self.module}'s metrics"
        )

    async def stop(self) -> float:
        """SIGTERM; the seconds it took to exit (cleanly)."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(self.process.wait, STOP_BOUND_S + 5)
        took = time.monotonic() - started
        assert code == 0, f"{self.module} exited with {code}:\n{self.log.read_text()}"
        return took

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def kill_nats(server: EmbeddedNats) -> None:
    """SIGKILL, and wait (in a thread of its own: it blocks) until it is gone."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGKILL)
    process = server.process
    asyncio.run(eventually(lambda: not process.running, within_s=10))


def nats_env(settings: Settings) -> dict[str, str]:
    """The NATS variables of `settings`, for a platform process started as a program."""
    env = {"KILN_NATS_URL": ",".join(settings.nats_servers)}
    if settings.nats_creds is not None:
        env["KILN_NATS_CREDS"] = str(settings.nats_creds)
    if settings.nats_signing_key is not None:
        env["KILN_NATS_SIGNING_KEY"] = settings.nats_signing_key
    if settings.nats_operator_signing_key is not None:
        env["KILN_NATS_OPERATOR_SIGNING_KEY"] = settings.nats_operator_signing_key
    if settings.nats_system_creds is not None:
        env["KILN_NATS_SYSTEM_CREDS"] = str(settings.nats_system_creds)
    return env


def with_nats(settings: Settings, server: EmbeddedNats) -> Settings:
    """`settings` for the NATS server `server` (with its credentials)."""
    return settings.replace(nats_url=server.url, **server.settings())


_Server = TypeVar("_Server", bound=EmbeddedService)


@contextmanager
def own_server(kind: type[_Server], root: Path, *, start_s: float = 30) -> Iterator[_Server]:
    """An embedded server of a test module's own, on fresh ports, since its tests stop or
    kill it; stopped on the way out."""
    used: set[int] = set()
    ports = {}
    for name in kind.default_ports:
        ports[name] = pick_port([], used)
        used.add(ports[name])
    server = kind(root, ports, durable=False)
    server.start(start_s)
    try:
        yield server
    finally:
        server.stop(15)


async def finished_jobs(
    platform: Platform, call_ids: list[str], *, within_s: float
) -> list[dict[str, Any]]:
    """The views of the jobs `call_ids`, in order, once none is queued or running."""
    async with platform.client() as client:

        async def finished() -> list[dict[str, Any]]:
            views = [(await client.get(f"/v1/calls/{call_id}")).json() for call_id in call_ids]
            assert not (left := [v for v in views if v["status"] in ("queued", "running")]), left
            return views

        return await eventually(finished, within_s=within_s, every_s=0.1, what="the jobs' ends")

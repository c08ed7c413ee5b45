"""Platform processes SIGKILLed, each a process of its own as production runs them: the
scheduler leader (a standby takes over and scaling goes on), and a node agent (its replicas go
with it, their calls are answered `worker_lost` at once, and replacements start on another
node)."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import httpx
import pytest
from eventually import eventually
from kit import RETRYABLE
from stack import Platform, Service

LEASE_S = 2.0
pytestmark = [pytest.mark.integration, pytest.mark.without_scheduler(lease_s=LEASE_S)]
_GONE = ("lost", "stopped", "failed")
APP = """
import time

import kiln

app = kiln.App("kills")


@app.function(
    gpu="A10G", min_replicas=1, max_replicas=1, concurrency=2, idle_timeout=600,
    startup_timeout=60,
)
def hold(seconds: float) -> str:
    time.sleep(seconds)
    return "held"


@app.function(idle_timeout=60)
def later() -> str:
    return "later"
"""


def service(platform: Platform, module: str, home: Path, **env: str) -> Service:
    settings = platform.settings
    return Service.start(
        module, settings, home, namespace=settings.namespace,
        KILN_SNAPSHOT_SIGNING_KEY=str(settings.snapshot_signing_key),
        KILN_SCHEDULER_LEASE_S=str(LEASE_S), **env,
    )  # fmt: skip


async def leading(scheduler: Service) -> bool:
    try:
        return "kiln_scheduler_leading 1.0" in await scheduler.metrics()
    except httpx.HTTPError:
        return False


async def test_a_killed_scheduler_leader_and_node_agent_are_survived(
    platform: Platform, chaos: random.Random, tmp_path: Path
) -> None:
    schedulers = [service(platform, "kiln.scheduler", tmp_path / f"s{i}") for i in range(2)]
    agents = {
        name: service(
            platform,
            "kiln.invoker",
            tmp_path / name,
            KILN_NODE_ID=name,
            KILN_NODE_GPUS="A10G:1",
            KILN_STANDBY_PROCESSES="0",
            KILN_SANDBOX="off",
        )
        for name in ("chaos-a", "chaos-b")
    }
    try:
        for each in schedulers:
            await each.wait_for("kiln_scheduler_leading")
        app_file = tmp_path / "kills.py"
        app_file.write_text(APP)
        await platform.deploy(app_file)
        await eventually(lambda: platform.ready_replicas("kills/hold"), within_s=90, every_s=0.2)

        # The scheduler leader dies; the standby takes over within about two leases.
        [leader] = [s for s in schedulers if await leading(s)]
        [standby] = [s for s in schedulers if s is not leader]
        leader.kill()
        killed = time.monotonic()
        await eventually(lambda: leading(standby), within_s=3 * LEASE_S + 2, every_s=0.1)
        takeover = time.monotonic() - killed
        # Scaling goes on: a function with no replica gets one for its first call.
        later = await platform.call("kills/later")
        assert later.status_code == 200, later.text

        # The node agent holding the replica dies while it runs calls.
        [replica] = await platform.ready_replicas("kills/hold")
        victim, survivor = replica["node"], ({"chaos-a", "chaos-b"} - {replica["node"]}).pop()
        async with platform.client() as client:
            held = [
                asyncio.create_task(client.post("/v1/run/kills/hold", json={"seconds": 20}))
                for _ in range(2)
            ]
            await asyncio.sleep(chaos.uniform(1.0, 2.0))
            agents[victim].kill()
            killed = time.monotonic()
            answers = await asyncio.wait_for(asyncio.gather(*held), 30)
            lost_in = time.monotonic() - killed
        for answer in answers:
            assert answer.status_code == 502, answer.text
            assert answer.json()["error"]["code"] == "worker_lost"
        assert lost_in < 10  # at once, not at the calls' deadline

        # A replacement serves from the other node.
        async def replaced() -> bool:
            response = await platform.call("kills/hold", json={"seconds": 0})
            if response.status_code not in RETRYABLE | {200, 504}:
                pytest.fail(response.text)
            return response.status_code == 200

        await eventually(replaced, within_s=90, every_s=0.2, what="a replacement serving")
        live = [r for r in await platform.replicas("kills/hold") if r["state"] not in _GONE]
        assert {r["node"] for r in live} == {survivor}, live
        print(f"takeover after the leader's kill: {takeover:.1f} s; calls of the killed node "
              f"answered worker_lost after {lost_in:.1f} s")  # fmt: skip
    finally:
        for each in [*schedulers, *agents.values()]:
            each.kill()

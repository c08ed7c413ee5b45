"""Placement with more than one node agent on the real stack: a replica lands on a node with a
free slot of its GPU type (simulated GPU slots stand for a GPU host), CPU functions stay on CPU
slots, and a node's standbys and cached snapshots reach the scheduler in its heartbeats."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from stack import Platform, extra_node, platform_fixture  # noqa: F401 - the fixture

from kiln.db.enums import NodeState
from kiln.db.models import Node
from kiln.db.session import create_engine

pytestmark = pytest.mark.integration

PLACED = """
import os

import kiln

app = kiln.App("placed")


@app.function(gpu="H100", idle_timeout=60)
def on_gpu() -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "")


@app.function(gpu="A10G", idle_timeout=60, startup_timeout=3)
def on_missing_gpu() -> str:
    return "never"


@app.function(idle_timeout=60)
def on_cpu() -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "")
"""


async def test_replicas_land_on_nodes_with_their_gpu_type(
    platform: Platform, tmp_path: Path
) -> None:
    app_file = tmp_path / "placed.py"
    app_file.write_text(PLACED)
    async with extra_node(platform, tmp_path / "gpu-home", "gpu-node", {"H100": 2}):
        await platform.deploy(app_file)
        gpu, cpu = await asyncio.gather(
            platform.call("placed/on_gpu"), platform.call("placed/on_cpu")
        )
        assert gpu.status_code == 200, gpu.text
        assert gpu.json() == "0"  # the one simulated H100 it was given
        assert cpu.status_code == 200, cpu.text
        assert cpu.json() == ""
        [on_gpu] = await platform.replicas("placed/on_gpu")
        assert (on_gpu["node"], on_gpu["gpu"]) == ("gpu-node", "H100")
        [on_cpu] = await platform.replicas("placed/on_cpu")
        assert (on_cpu["node"], on_cpu["gpu"]) == (platform.settings.node_id, None)

        # No node has an A10G: the call waits for capacity (no replica, no error) until its
        # startup timeout, then times out.
        missing = await platform.call("placed/on_missing_gpu")
        assert missing.status_code == 504, missing.text
        assert missing.json()["error"]["code"] == "timeout"
        assert await platform.replicas("placed/on_missing_gpu") == []
        async with platform.client() as client:
            metrics = (await client.get("/metrics")).text
        assert 'kiln_scheduler_placement_failures_total{gpu="A10G"}' in metrics
        assert 'kiln_scheduler_replicas{app="placed",function="on_gpu"} 1.0' in metrics

    # The GPU node's agent is gone: once it has been silent a few heartbeats, it is lost.
    engine = create_engine(platform.settings, application_name="kiln-test")
    try:
        deadline = time.monotonic() + 15
        while True:
            async with engine.connect() as conn:
                state = await conn.scalar(sa.select(Node.state).where(Node.id == "gpu-node"))
            if state == NodeState.LOST:
                break
            assert time.monotonic() < deadline, f"gpu-node is still {state}"
            await asyncio.sleep(0.25)
    finally:
        await engine.dispose()

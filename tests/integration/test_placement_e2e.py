"""Placement with more than one node agent on the real stack: a replica lands on a node with a
free slot of its GPU type (simulated GPU slots stand for a GPU host), CPU functions stay on CPU
slots, and a node's standbys and cached snapshots reach the scheduler in its heartbeats."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from eventually import eventually
from sqlalchemy.ext.asyncio import AsyncEngine
from stack import Platform, extra_node, next_node_beat, node_lost

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
    platform: Platform, engine: AsyncEngine, tmp_path: Path
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
    await eventually(lambda: node_lost(engine, "gpu-node"), within_s=15)


CACHED = """
import os

import kiln

app = kiln.App("cached")


@app.cls(gpu="H100", idle_timeout=1)
class Model:
    @kiln.enter(snap=True)
    def load(self) -> None:
        import torch

        self.weights = torch.arange(1024, dtype=torch.float32)

    @kiln.method()
    def total(self) -> float:
        return float(self.weights.sum())
"""


async def test_a_cold_start_goes_to_the_node_that_caches_the_snapshot(
    platform: Platform, tmp_path: Path
) -> None:
    """Two empty nodes with a free H100 each: the cold start goes to the one holding the
    function's snapshot, although the other would win every other tie (fewer replicas, and its
    name sorts first)."""
    app_file = tmp_path / "cached.py"
    app_file.write_text(CACHED)
    async with extra_node(platform, tmp_path / "z", "node-z", {"H100": 1}):
        await platform.deploy(app_file)
        first = await platform.call("cached/Model.total", json={})
        assert first.status_code == 200, first.text
        [baked] = await platform.replicas("cached/Model")
        assert baked["node"] == "node-z"
        # node-z's agent seals what its replica baked and advertises it.
        beat = await next_node_beat(
            platform, lambda b: b.node_id == "node-z" and bool(b.snapshots), timeout_s=60
        )
        async with extra_node(platform, tmp_path / "a", "node-a", {"H100": 1}):
            await next_node_beat(platform, lambda b: b.node_id == "node-a")
            await eventually(lambda: platform.scaled_to_zero("cached/Model"), within_s=30)
            # Placement goes by the nodes' heartbeats: node-z's must show its GPU free again.
            await next_node_beat(platform, lambda b: b.node_id == "node-z" and b.free["H100"] == 1)
            second = await platform.call("cached/Model.total", json={})
            assert second.status_code == 200, second.text
            assert second.json() == first.json() == float(sum(range(1024)))
            # The report that carries the origin travels beside the reply.
            restored = await eventually(lambda: _with_origin(platform, "cached/Model"), within_s=15)
            assert restored["node"] == "node-z", (restored, beat.snapshots)
            assert restored["origin"] == "snapshot"


async def _with_origin(platform: Platform, target: str) -> dict[str, Any] | None:
    """The function's replica once it has reported its origin."""
    [replica] = await platform.replicas(target)
    return replica if replica["origin"] is not None else None

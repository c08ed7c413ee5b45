"""Losing a host in the middle of a burst, with three node agents on the real stack: the calls
its replicas held fail fast as `worker_lost` (never as a timeout), every other call is served,
the scheduler records the node and its replicas lost and puts replacements on the nodes that
are left (issue 5: failure handling)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from eventually import eventually
from sqlalchemy.ext.asyncio import AsyncEngine
from stack import Platform, extra_node, node_lost

from kiln.db.enums import ReplicaState
from kiln.db.models import Function, Replica

pytestmark = pytest.mark.integration

BURST = """
import time

import kiln

app = kiln.App("burst")


@app.function(gpu="H100", max_replicas=4, idle_timeout=60, startup_timeout=60)
def work(seconds: float) -> str:
    time.sleep(seconds)
    return "done"
"""
CALLS = 24
CALL_S = 1.0


async def test_a_node_lost_mid_burst_costs_only_its_calls_and_its_replicas_are_replaced(
    platform: Platform, engine: AsyncEngine, tmp_path: Path
) -> None:
    app_file = tmp_path / "burst.py"
    app_file.write_text(BURST)
    async with (
        extra_node(platform, tmp_path / "a", "node-a", {"H100": 2}) as node_a,
        extra_node(platform, tmp_path / "b", "node-b", {"H100": 2}) as node_b,
        extra_node(platform, tmp_path / "c", "node-c", {"H100": 2}) as node_c,
    ):
        nodes = {"node-a": node_a, "node-b": node_b, "node-c": node_c}
        await platform.deploy(app_file)
        async with platform.client() as client:
            burst = [
                asyncio.create_task(client.post("/v1/run/burst/work", json={"seconds": CALL_S}))
                for _ in range(CALLS)
            ]
            # Once the burst has its replicas and they are busy, the host of one of them dies.
            victim, held = await eventually(lambda: _busy_node(platform), within_s=60)
            killed_at = time.monotonic()
            await nodes[victim].kill()
            responses: list[httpx.Response] = await asyncio.gather(*burst)
            finished_at = time.monotonic()

        outcomes = Counter(_outcome(r) for r in responses)
        lost = outcomes["worker_lost"]
        assert set(outcomes) <= {"ok", "worker_lost"}, outcomes
        # Only the calls the dead host's replicas held are lost (one each: concurrency 1).
        assert 1 <= lost <= held, outcomes
        assert outcomes["ok"] == CALLS - lost
        # Failed fast: the burst did not wait for a call timeout.
        assert finished_at - killed_at < 30

        # The platform knows: the node is lost, so are its replicas; replacements ran elsewhere.

        async def replicas_lost() -> list[tuple[str, ReplicaState, float]]:
            rows = await _replica_rows(engine)
            assert {state for node, state, _ in rows if node == victim} == {ReplicaState.LOST}
            return rows

        rows = await eventually(replicas_lost, within_s=15)
        later = [node for node, _, started in rows if started > killed_at]
        assert later, "no replica was started after the node died"
        assert victim not in later
        await eventually(lambda: node_lost(engine, victim), within_s=15)

        # And the function keeps serving on the nodes that are left.
        after = await asyncio.gather(
            *(platform.call("burst/work", json={"seconds": 0.1}) for _ in range(4))
        )
        assert [r.status_code for r in after] == [200] * 4
        assert victim not in {r["node"] for r in await platform.replicas("burst/work")}


async def _busy_node(platform: Platform) -> tuple[str, int]:
    """The node of a ready replica with a call in flight, once the burst reached every node it
    will, and how many ready replicas it has: a check for `eventually`."""
    replicas = await platform.replicas("burst/work")
    ready = [r for r in replicas if r["state"] == "ready"]
    busy = [r for r in ready if r["in_flight"] > 0]
    assert len(ready) >= 3, f"the burst never got going: {replicas}"
    assert busy, f"the burst never got going: {replicas}"
    node = busy[0]["node"]
    return node, sum(1 for r in ready if r["node"] == node)


def _outcome(response: httpx.Response) -> str:
    if response.status_code == 200:
        return "ok"
    code: str = response.json()["error"]["code"]
    return code


async def _replica_rows(engine: AsyncEngine) -> list[tuple[str, ReplicaState, float]]:
    """(node, state, start in this process's monotonic clock) of every replica of burst/work."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.select(
                    Replica.node_id,
                    Replica.state,
                    sa.func.extract("epoch", sa.func.now() - Replica.started_at),
                )
                .join(Function, Function.id == Replica.function_id)
                .where(Function.name == "work")
            )
        ).all()
    now = time.monotonic()
    return [(node, state, now - float(age)) for node, state, age in rows]

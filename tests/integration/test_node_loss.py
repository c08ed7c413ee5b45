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
from stack import Platform, extra_node

from kiln.db.enums import NodeState, ReplicaState
from kiln.db.models import Function, Node, Replica
from kiln.db.session import create_engine

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
    platform: Platform, tmp_path: Path
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
            victim, held = await _busy_node(platform)
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
        deadline = time.monotonic() + 15
        while True:
            rows = await _replica_rows(platform)
            states = {state for node, state, _ in rows if node == victim}
            if states == {ReplicaState.LOST} or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        assert states == {ReplicaState.LOST}
        later = [node for node, _, started in rows if started > killed_at]
        assert later, "no replica was started after the node died"
        assert victim not in later
        assert await _node_state(platform, victim) == NodeState.LOST

        # And the function keeps serving on the nodes that are left.
        after = await asyncio.gather(
            *(platform.call("burst/work", json={"seconds": 0.1}) for _ in range(4))
        )
        assert [r.status_code for r in after] == [200] * 4
        assert victim not in {r["node"] for r in await platform.replicas("burst/work")}


async def _busy_node(platform: Platform) -> tuple[str, int]:
    """The node of a ready replica with a call in flight, once the burst reached every node it
    will, and how many ready replicas it has."""
    deadline = time.monotonic() + 60
    while True:
        replicas = await platform.replicas("burst/work")
        ready = [r for r in replicas if r["state"] == "ready"]
        busy = [r for r in ready if r["in_flight"] > 0]
        if len(ready) >= 3 and busy:
            node = busy[0]["node"]
            return node, sum(1 for r in ready if r["node"] == node)
        assert time.monotonic() < deadline, f"the burst never got going: {replicas}"
        await asyncio.sleep(0.1)


def _outcome(response: httpx.Response) -> str:
    if response.status_code == 200:
        return "ok"
    code: str = response.json()["error"]["code"]
    return code


async def _replica_rows(platform: Platform) -> list[tuple[str, ReplicaState, float]]:
    """(node, state, start in this process's monotonic clock) of every replica of burst/work."""
    engine = create_engine(platform.settings, application_name="kiln-test")
    try:
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
    finally:
        await engine.dispose()
    now = time.monotonic()
    return [(node, state, now - float(age)) for node, state, age in rows]


async def _node_state(platform: Platform, node_id: str) -> NodeState | None:
    engine = create_engine(platform.settings, application_name="kiln-test")
    try:
        deadline = time.monotonic() + 15
        while True:
            async with engine.connect() as conn:
                state = await conn.scalar(sa.select(Node.state).where(Node.id == node_id))
            if state == NodeState.LOST or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.25)
    finally:
        await engine.dispose()

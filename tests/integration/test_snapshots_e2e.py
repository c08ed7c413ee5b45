"""Snapshots and cold starts end to end: a class is baked on its first cold start and restored
(from a standby process) on the next; a tampered snapshot is never loaded, the shared copy or
the setup hooks take over, and the snapshot is baked again."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nats
import pytest
import sqlalchemy as sa
from eventually import eventually
from nats.aio.msg import Msg
from stack import Platform, next_node_beat

from kiln._nats import connect_options
from kiln.db.models import Function, Replica
from kiln.db.session import create_engine
from kiln.functions.package import package
from kiln.snapshots.shared import shared_snapshots
from kiln.wire import ReplicaHeartbeat, Subjects, affinity_id, decode

pytestmark = pytest.mark.integration

SNAPPY = """
import os
import secrets
import sys

import kiln

app = kiln.App("snappy")
# Which process this is (pids repeat: each sandbox numbers its own from 1).
PROCESS = secrets.token_hex(8)


@app.cls(idle_timeout=1)
class Model:
    @kiln.enter(snap=True)
    def load(self) -> None:
        import torch

        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8)
        )
        self.net[2].weight = torch.nn.Parameter(self.net[2].weight.to(torch.float64).float())
        self.scale = torch.tensor(0.5, dtype=torch.bfloat16)
        self.labels = ["a", "b"]
        self.built_in = PROCESS

    @kiln.enter()
    def warm(self) -> None:
        self.warmed_in = PROCESS

    @kiln.method()
    def run(self) -> dict:
        import torch

        with torch.no_grad():
            out = self.net(torch.ones(1, 256)) * self.scale.float()
        return {
            "out": out.tolist(),
            "labels": self.labels,
            "built_in": self.built_in,
            "warmed_in": self.warmed_in,
            "pid": PROCESS,
            "program": sys.argv[0],
        }
"""


async def replica_origins(platform: Platform, function: str) -> list[str | None]:
    """Every replica the function ever had, oldest first, with how it was built."""
    engine = create_engine(platform.settings, application_name="kiln-test")
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.select(Replica.origin)
                .join(Function, Function.id == Replica.function_id)
                .where(Function.name == function)
                .order_by(Replica.started_at)
            )
            return [origin for (origin,) in rows]
    finally:
        await engine.dispose()


async def cold_call(
    platform: Platform, target: str, function: str, *, standby: bool = False
) -> dict[str, Any]:
    """Wait until the function has no replica (and, with `standby`, until a standby process
    is ready), then call it (a cold start) and return the result with the origin its new
    replica reported."""
    app, _, name = target.partition("/")
    await eventually(
        lambda: platform.scaled_to_zero(f"{app}/{name.partition('.')[0]}"), within_s=30
    )
    if standby:  # the node agent's own word: its heartbeat counts the standbys it holds ready
        await next_node_beat(platform, lambda b: b.standbys.get("none", 0) >= 1, timeout_s=90)
    before = len(await replica_origins(platform, function))
    response = await platform.call(target)
    assert response.status_code == 200, response.text

    async def origin() -> str | None:  # the report that carries it travels beside the reply
        origins = await replica_origins(platform, function)
        return origins[-1] if len(origins) > before else None

    return {**response.json(), "origin": await eventually(origin, within_s=30)}


def snapshot_dirs(platform: Platform) -> list[Path]:
    root = platform.settings.home / "snapshots"
    return [p for p in root.iterdir() if len(p.name) == 64] if root.exists() else []


async def test_a_class_is_baked_on_its_first_cold_start_and_restored_on_the_next(
    platform: Platform, tmp_path: Path
) -> None:
    app_file = tmp_path / "snappy.py"
    app_file.write_text(SNAPPY)
    await platform.deploy(app_file)

    first = await cold_call(platform, "snappy/Model.run", "Model")
    assert first["origin"] == "baked"
    assert first["built_in"] == first["warmed_in"] == first["pid"]
    await eventually(lambda: snapshot_dirs(platform), within_s=30)  # sealed by the agent
    # The node tells the scheduler it has it, so placement can prefer it.
    wanted = affinity_id(package(app_file).digest, "snappy/Model")
    beat = await next_node_beat(platform, lambda b: wanted in b.snapshots)
    assert beat.node_id == platform.settings.node_id

    states: set[str] = set()
    watcher = await nats.connect(**connect_options(platform.settings))

    async def note_state(msg: Msg) -> None:
        states.add(decode(ReplicaHeartbeat, msg.data).state)

    subjects = Subjects(platform.settings.namespace)
    await watcher.subscribe(subjects.all_replica_heartbeats, cb=note_state)
    try:
        second = await cold_call(platform, "snappy/Model.run", "Model", standby=True)
    finally:
        await watcher.close()
    assert {"starting", "restoring", "ready"} <= states  # what `kiln ps` can show meanwhile
    assert second["origin"] == "snapshot"
    assert second["pid"] != first["pid"]
    # The setup hook did not run again: its state (and the pid it recorded) came back.
    assert second["built_in"] == first["built_in"]
    assert second["warmed_in"] == second["pid"]  # plain @enter hooks run after every restore
    assert second["out"] == first["out"]
    assert second["labels"] == ["a", "b"]
    # It was a standby process: interpreter, torch and the runtime imported before the call.
    assert second["program"].endswith("kiln/invoker/standby.py")

    async with platform.client() as client:
        metrics = (await client.get("/metrics")).text
    counted = [line for line in metrics.splitlines() if line.startswith("kiln_cold_starts_total")]
    assert 'kiln_cold_starts_total{origin="snapshot",process="standby"} 1.0' in counted, counted
    for phase in ("schedule", "assign", "code_load", "restore", "restore_cpu_pages",
                  "restore_unpickle", "enter", "first_call"):  # fmt: skip
        assert f'kiln_cold_start_phase_seconds_count{{phase="{phase}"}}' in metrics, phase


def tamper(blob: Path) -> None:
    """Flip one byte of a weight, keeping the size: only a checksum can tell."""
    blob.chmod(0o644)
    with blob.open("r+b") as f:
        f.seek(blob.stat().st_size - 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


async def test_a_tampered_snapshot_is_never_loaded_and_is_baked_again(
    platform: Platform, tmp_path: Path
) -> None:
    app_file = tmp_path / "snappy.py"
    app_file.write_text(SNAPPY.replace('"snappy"', '"tamper"').replace("class Model", "class Tm"))
    await platform.deploy(app_file)
    before = set(snapshot_dirs(platform))
    nc = await nats.connect(**connect_options(platform.settings))
    shared = shared_snapshots(platform.settings, nc.jetstream())
    try:
        first = await cold_call(platform, "tamper/Tm.run", "Tm")

        async def sealed_and_shared() -> bool:
            new = set(snapshot_dirs(platform)) - before
            return bool(new) and await shared.has(next(iter(new)).name)

        await eventually(sealed_and_shared, within_s=30)
        (snapshot,) = set(snapshot_dirs(platform)) - before
        key = snapshot.name

        # Tampered here, intact in the shared store: the node fetches the good copy.
        tamper(snapshot / "cpu.safetensors")
        fetched = await cold_call(platform, "tamper/Tm.run", "Tm")
        assert fetched["origin"] == "snapshot"
        assert fetched["built_in"] == first["pid"]
        assert fetched["out"] == first["out"]  # not the tampered weight

        # Tampered here and gone from the shared store: the hooks run and bake it again.
        tamper(snapshot / "cpu.safetensors")
        await shared.delete(key)
        fallback = await cold_call(platform, "tamper/Tm.run", "Tm")
        assert fallback["origin"] == "fallback"
        assert fallback["built_in"] == fallback["pid"]
        assert fallback["out"] == first["out"]

        async def rebaked() -> bool:
            return (snapshot / "manifest.sig").exists() and await shared.has(key)

        await eventually(rebaked, within_s=30)
        restored = await cold_call(platform, "tamper/Tm.run", "Tm")
        assert restored["origin"] == "snapshot"
        assert restored["built_in"] == fallback["pid"]
        assert restored["out"] == first["out"]
    finally:
        await nc.close()

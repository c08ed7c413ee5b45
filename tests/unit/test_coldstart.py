"""A replica's cold start against a node agent's answers (a stand-in link; no NATS): bake on a
miss, restore on a hit, fall back to the hooks when the snapshot fails, and give up baking a
state that cannot be captured, without failing the replica."""

from __future__ import annotations

import secrets
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import kiln
from kiln.invoker.coldstart import ColdStart, SnapshotLink, build_instance
from kiln.invoker.target import Target, build_target
from kiln.snapshots.imports import expand
from kiln.snapshots.manifest import GRAPH, Runtime, snapshot_key
from kiln.snapshots.store import SnapshotCache
from kiln.wire import Origin

app = kiln.App("coldstart-tests")
SNAP_RUNS: list[int] = []


@app.cls
class Model:
    @kiln.enter(snap=True)
    def load(self) -> None:
        SNAP_RUNS.append(1)
        torch.manual_seed(0)
        self.net = torch.nn.Linear(32, 4)
        self.table = {"rows": [1, 2, 3]}

    @kiln.enter()
    def warm(self) -> None:
        import fractions  # a plain hook's import counts too

        self.warm_thread = threading.current_thread().name
        self.ratio = fractions.Fraction(1, 3)

    @kiln.method()
    def weight_sum(self) -> float:
        return float(self.net.weight.sum())


@app.cls
class Unkeepable:
    @kiln.enter(snap=True)
    def load(self) -> None:
        self.lock = threading.Lock()  # no snapshot can keep a lock

    @kiln.method()
    def ok(self) -> bool:
        return True


class Link(SnapshotLink):
    """Answers as a node agent would, and remembers what it was asked."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, dict[str, Any]]] = []

    async def ask(self, op: str, timeout_s: float = 30, **fields: Any) -> Any:
        self.asked.append((op, fields))
        return self.answers.get(op, {})


def target(name: str) -> Target:
    spec = next(s for s in app.spec() if s.name == name)
    return build_target(spec, app.functions[name])


@pytest.fixture
def cache(tmp_path: Path) -> SnapshotCache:
    return SnapshotCache(tmp_path / "cache", secrets.token_hex(16))


KEY = snapshot_key("digest", "Model", Runtime.current())


async def bake_once(cache: SnapshotCache) -> Path:
    staging = cache.staging(KEY)
    link = Link({"open": {"bake": str(staging)}, "seal": {"ok": True}})
    # As a standby that had imported everything but this test module's imports would start.
    record = ColdStart(preloaded=frozenset(sys.modules) - {"fractions"})
    await build_instance(target("Model"), link, record, private=False)
    assert record.sealing is not None
    await record.sealing
    assert record.origin is Origin.BAKED
    assert [op for op, _ in link.asked] == ["open", "seal"]
    assert {"snap_hooks", "bake", "enter"} <= set(record.phases)
    # The seal, asked for once the plain hooks ran, names what the function needed: what the
    # hooks imported and what the object graph refers to, never Kiln's own modules.
    imports = link.asked[1][1]["imports"]
    assert {"fractions", "torch.nn.modules.linear"} <= expand(imports)
    assert not [name for name in imports if name.startswith("kiln")]
    snapshot = cache.seal(
        staging,
        key=KEY,
        function="t/Model",
        code_digest="digest",
        runtime=Runtime.current(),
        imports=tuple(imports),
    )
    assert snapshot.manifest.imports == tuple(imports)
    assert cache.imports(KEY) == tuple(imports)
    return snapshot.directory


async def test_a_miss_runs_the_hooks_and_bakes(cache: SnapshotCache) -> None:
    directory = await bake_once(cache)
    assert (directory / GRAPH).exists()
    assert cache.open(KEY, full=True).manifest.tensors == 2


@pytest.mark.parametrize("private", [False, True])
async def test_a_hit_restores_without_running_the_snap_hooks(
    cache: SnapshotCache, private: bool
) -> None:
    directory = await bake_once(cache)
    runs = len(SNAP_RUNS)
    began: list[str] = []
    restored, record = target("Model"), ColdStart(on_phase=began.append)
    await build_instance(
        restored, Link({"open": {"path": str(directory)}}), record, private=private
    )
    assert began == ["restore", "enter"]  # how a replica knows to say "restoring"
    assert record.origin is Origin.SNAPSHOT
    assert len(SNAP_RUNS) == runs
    assert record.snapshot_bytes == (32 * 4 + 4) * 4
    assert "restore" in record.phases
    assert "snap_hooks" not in record.phases
    steps = {"restore_graph_read", "restore_cpu_pages", "restore_unpickle"}
    assert steps <= set(record.phases)  # the restore broken down, for the report and the log
    assert sum(record.phases[step] for step in steps) <= record.phases["restore"]
    torch.manual_seed(0)
    assert torch.equal(restored.instance.net.weight, torch.nn.Linear(32, 4).weight)
    assert restored.instance.table == {"rows": [1, 2, 3]}
    assert restored.instance.warm_thread.startswith("kiln-call")  # plain hooks still ran


async def test_a_snapshot_that_fails_to_restore_falls_back_and_bakes_again(
    cache: SnapshotCache,
) -> None:
    directory = await bake_once(cache)
    broken = directory.parent / "broken"
    broken.mkdir()
    for path in directory.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / GRAPH).write_bytes(b"not a pickle")
    staging = cache.staging(KEY)
    link = Link({"open": {"path": str(broken)}, "failed": {"bake": str(staging)}})
    runs = len(SNAP_RUNS)
    fallen, record = target("Model"), ColdStart()
    await build_instance(fallen, link, record, private=False)
    assert record.sealing is not None
    await record.sealing
    assert record.origin is Origin.FALLBACK
    assert record.fallback_reason == (
        "SnapshotError: the snapshot's objects cannot be rebuilt (invalid load key, 'n'.)"
    )
    assert len(SNAP_RUNS) == runs + 1
    assert [op for op, _ in link.asked] == ["open", "failed", "seal"]
    assert link.asked[1][1]["error"] == record.fallback_reason
    assert (staging / GRAPH).exists()  # baked again, for the agent to seal
    assert fallen.instance.net.weight.shape == (4, 32)


async def test_the_agent_refusing_a_snapshot_is_a_fallback(cache: SnapshotCache) -> None:
    link = Link({"open": {"fallback": "snapshot_tampered: cpu.safetensors does not match"}})
    record = ColdStart()
    await build_instance(target("Model"), link, record, private=False)
    assert record.origin is Origin.FALLBACK
    assert record.fallback_reason == "snapshot_tampered: cpu.safetensors does not match"


async def test_a_state_that_cannot_be_captured_is_abandoned_not_fatal(
    cache: SnapshotCache,
) -> None:
    staging = cache.staging(KEY)
    link = Link({"open": {"bake": str(staging)}})
    unkeepable, record = target("Unkeepable"), ColdStart()
    await build_instance(unkeepable, link, record, private=False)
    assert record.origin is Origin.HOOKS
    ((op, fields),) = link.asked[1:]
    assert op == "abandon"
    assert "self.lock" in fields["error"]
    assert (await unkeepable.call("ok", b"{}", "application/json")).body == b"true"


async def test_an_unreachable_agent_means_hooks(cache: SnapshotCache) -> None:
    class Down(Link):
        async def ask(self, op: str, timeout_s: float = 30, **fields: Any) -> Any:
            raise TimeoutError("no agent")

    record = ColdStart()
    await build_instance(target("Model"), Down({}), record, private=False)
    assert record.origin is Origin.HOOKS

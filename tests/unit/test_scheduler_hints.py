"""A router's demand hint starts the first replica of a function with none first thing in the
next pass: without asking the queue and before the database is read for every function (a
stand-in NATS and database; placement and the pass itself are the real code)."""

from __future__ import annotations

import asyncio
import time
import uuid
from types import SimpleNamespace
from typing import Any, cast

from kiln.scheduler.records import FunctionRow
from kiln.scheduler.scheduler import Scheduler
from kiln.wire import NodeHeartbeat, encode


class Records:
    """The database side, with a full pass that hangs until released."""

    def __init__(self, row: FunctionRow) -> None:
        self.row = row
        self.release = asyncio.Event()
        self.recorded: list[str] = []
        self.launched = asyncio.Event()

    async def load_functions(self) -> dict[uuid.UUID, FunctionRow]:
        await self.release.wait()
        return {self.row.id: self.row}

    async def record_replica(self, launch: Any, node_id: str, reply: Any) -> None:
        self.recorded.append(launch.replica_id)
        self.launched.set()

    async def record_node(self, beat: Any) -> None: ...

    async def sweep_unadopted(self, known: Any) -> None: ...

    async def record_beats(self, changed: Any) -> None: ...

    async def set_state(self, *args: Any, **kwargs: Any) -> None: ...

    async def oldest_queued_job_s(self) -> float:
        return 0.0


def row() -> FunctionRow:
    return FunctionRow(
        id=uuid.uuid4(), app="app", name="Model", customer_id=uuid.uuid4(),
        version_id=uuid.uuid4(), generation=1, digest="d" * 64, entrypoint="app.py",
        spec={"resources": {"gpu": "none"}}, gpu="none", min_replicas=0, max_replicas=4,
        buffer_replicas=0, idle_timeout_s=60, target_concurrency=1, startup_timeout_s=600,
        timeout_s=60,
    )  # fmt: skip


async def test_a_hint_starts_the_first_replica_before_the_pass_reads_the_database() -> None:
    function = row()
    js = SimpleNamespace()
    nc = SimpleNamespace(jetstream=lambda: js, is_connected=True)
    scheduler = Scheduler(cast(Any, nc), cast(Any, None), "t")
    records = Records(function)
    scheduler.records = cast(Any, records)
    scheduler.functions = {function.id: function}  # as the last full pass loaded it
    beat = NodeHeartbeat(node_id="n1", hostname="h", slots={"none": 4}, free={"none": 4},
                         standbys={"none": 1})  # fmt: skip
    await scheduler._on_node(cast(Any, SimpleNamespace(data=encode(beat))))
    asked_queue: list[uuid.UUID] = []
    commands: list[dict[str, object]] = []

    async def pending(function_id: uuid.UUID) -> int:
        asked_queue.append(function_id)
        return 1

    async def command(node_id: str, command: dict[str, object]) -> dict[str, object]:
        commands.append(command)
        return {"ok": True, "node_id": node_id, "billable_since": time.time()}

    scheduler._pending = pending  # type: ignore[method-assign]
    scheduler._command = command  # type: ignore[method-assign]

    await scheduler._on_demand(cast(Any, SimpleNamespace(subject=f"t.demand.{function.id.hex}")))
    assert scheduler.wake.is_set()
    full_pass = asyncio.create_task(scheduler.reconcile())
    await asyncio.wait_for(records.launched.wait(), 5)
    assert not full_pass.done()  # the database read still hangs
    assert [c["op"] for c in commands] == ["start"]
    assert asked_queue == []  # a hint means a call waits; the queue is asked by the full pass
    tracked = scheduler.replicas[records.recorded[0]]
    assert tracked.schedule_s is not None

    records.release.set()  # the pass goes on: one replica serves the one call, no second
    await asyncio.wait_for(full_pass, 5)
    assert asked_queue == [function.id]
    assert [c["op"] for c in commands] == ["start"]
    assert scheduler.hinted == set()

"""Adoption, on a fake clock: a scheduler that restarted (or took over) tracks the live
replicas that heartbeat to it, as their rows describe them, instead of starting them again;
once every live replica has had time to say so, the rows of those that did not are written
off. A heartbeat alone adopts nothing: it is a replica's word, and replicas run customers'
code."""

from __future__ import annotations

import uuid

from scheduler_fakes import (
    Records,
    Row,
    function_row,
    make_scheduler,
    node_beat,
    one_replica_ordered,
    replica_beat,
)

from kiln._clock import FakeClock
from kiln.db.enums import ReplicaState
from kiln.scheduler.observe import ADOPTED_STARTUP_TIMEOUT_S
from kiln.scheduler.reconcile import ADOPTION_WINDOW_S


def rows_of_an_earlier_scheduler() -> tuple[Records, str, str]:
    """A function with min_replicas=1 and two live rows: one replica still runs, one died
    with the scheduler that started it."""
    function = function_row(min_replicas=1)
    running, dead = str(uuid.uuid4()), str(uuid.uuid4())
    records = Records(functions={function.id: function})
    for replica_id in (running, dead):
        records.replicas[replica_id] = Row(str(function.id), str(function.version_id), "n1")
    return records, running, dead


async def test_a_restarted_scheduler_adopts_what_runs_and_writes_off_what_does_not() -> None:
    clock = FakeClock()
    records, running, dead = rows_of_an_earlier_scheduler()
    [function] = records.functions.values()
    scheduler, nc = make_scheduler(clock, records)

    async def beat_and_pass(advance: float) -> None:
        clock.advance(advance)
        await scheduler.observer.on_node(node_beat("n1", free=3))
        await scheduler.observer.on_replica(replica_beat(running, function, idle_since=0.0))
        await scheduler.reconcile()

    await beat_and_pass(0)
    adopted = scheduler.cluster.replicas[running]
    assert (adopted.function_id, adopted.node_id) == (str(function.id), "n1")
    assert adopted.launch is None  # where its billable time began is not known here
    assert adopted.startup_timeout_s == ADOPTED_STARTUP_TIMEOUT_S
    assert nc.ops("start") == []  # min_replicas=1 is met by the adopted replica
    assert records.replicas[running].state == ReplicaState.READY

    await beat_and_pass(ADOPTION_WINDOW_S)  # exactly the window: the dead may still speak
    assert records.swept == []
    await beat_and_pass(0.1)
    assert records.swept == [[running]]
    assert (records.replicas[dead].state, records.replicas[dead].stopped) == (
        ReplicaState.LOST,
        True,
    )
    assert records.replicas[running].state == ReplicaState.READY
    await beat_and_pass(1)
    assert records.swept == [[running]]  # once per start or takeover
    assert nc.ops("start") == []


async def test_heartbeats_without_a_live_row_of_that_function_adopt_nothing() -> None:
    clock = FakeClock()
    records, running, _ = rows_of_an_earlier_scheduler()
    [function] = records.functions.values()
    scheduler, _ = make_scheduler(clock, records)
    stranger = str(uuid.uuid4())  # no row: not one the platform started
    await scheduler.observer.on_replica(replica_beat(stranger, function))
    # A row of another function: the beat (sealed by this function's replica) lies about it.
    other = function_row()
    await scheduler.observer.on_replica(replica_beat(running, other))
    # A replica on its way out is not taken on.
    records.replicas[stopping := str(uuid.uuid4())] = Row(
        str(function.id), str(function.version_id), "n1"
    )
    await scheduler.observer.on_replica(
        replica_beat(stopping, function, state=ReplicaState.STOPPED)
    )
    assert scheduler.cluster.replicas == {}


async def test_a_replica_this_scheduler_started_is_not_adopted_twice() -> None:
    _clock, function, _records, scheduler, _nc, start = await one_replica_ordered()
    launched = scheduler.cluster.replicas[start["replica_id"]]
    await scheduler.observer.on_replica(replica_beat(start["replica_id"], function))
    assert scheduler.cluster.replicas[start["replica_id"]] is launched
    assert launched.launch is not None  # its billable start is known: usage can be closed
    assert launched.beat is not None

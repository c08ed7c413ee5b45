"""Crash-loop backoff on a fake clock: each failure in a row holds new starts twice as long,
up to a cap; a replica becoming ready resets the count; exits the scheduler asked for are no
failures."""

from __future__ import annotations

import uuid

import pytest
from scheduler_fakes import (
    Records,
    exit_event,
    function_row,
    make_scheduler,
    node_beat,
    one_replica_ordered,
    replica_beat,
)

from kiln._clock import FakeClock
from kiln.db.enums import ReplicaState
from kiln.scheduler.backoff import BACKOFF_CAP_S, CrashLoops, backoff_s, crashed


def test_delays_double_and_stop_at_the_cap() -> None:
    assert [backoff_s(n) for n in range(1, 9)] == [2, 4, 8, 16, 32, 60, 60, 60]
    assert BACKOFF_CAP_S == 60


def test_a_hold_lasts_its_delay_and_success_resets_the_count() -> None:
    loops, fn = CrashLoops(), uuid.uuid4()
    assert not loops.holds(fn, 0.0)
    assert loops.failed(fn, 100.0) == 2
    assert loops.holds(fn, 101.9)
    assert not loops.holds(fn, 102.0)
    assert loops.failed(fn, 102.0) == 4
    assert loops.failed(fn, 106.0) == 8
    assert not loops.holds(uuid.uuid4(), 106.0)  # per function
    loops.succeeded(fn)
    assert loops.holds(fn, 113.9)  # the hold running is served out
    assert loops.failed(fn, 120.0) == 2  # the next failure starts over


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"exit_code": 1}, True),
        ({"exit_code": -9}, True),  # killed (a memory cap)
        ({"exit_code": 0}, False),
        ({"exit_code": 1, "requested": True}, False),  # drained or stopped by the scheduler
    ],
)
def test_a_crash_is_an_exit_nobody_asked_for_with_a_nonzero_status(
    event: dict[str, object], expected: bool
) -> None:
    assert crashed(event) is expected


async def test_a_crash_looping_function_is_restarted_later_and_later_until_it_works() -> None:
    clock = FakeClock()
    function = function_row(min_replicas=1)
    records = Records(functions={function.id: function})
    scheduler, nc = make_scheduler(clock, records)
    await scheduler.observer.on_node(node_beat("n1"))

    async def pass_at(advance: float) -> list[str]:
        """A pass after `advance` seconds (the node beating meanwhile): the replicas started."""
        clock.advance(advance)
        await scheduler.observer.on_node(node_beat("n1"))
        before = len(nc.ops("start"))
        await scheduler.reconcile()
        return [c["replica_id"] for c in nc.ops("start")[before:]]

    async def crash(replica_id: str) -> None:
        await scheduler.observer.on_exit(exit_event(replica_id, function, exit_code=1))

    [first] = await pass_at(0)
    waited = []
    current = first
    for _ in range(7):
        await crash(current)
        assert records.replicas[current].state == ReplicaState.FAILED
        held = 0.0
        while not (started := await pass_at(0.5)):
            held += 0.5
        waited.append(held + 0.5)
        [current] = started
    # Two seconds after the first crash, then four, eight... up to a minute.
    assert waited == [2, 4, 8, 16, 32, 60, 60]

    # This one works: ready resets the count, and the next crash waits two seconds again.
    await scheduler.observer.on_replica(replica_beat(current, function))
    assert await pass_at(0.5) == []
    assert records.replicas[current].state == ReplicaState.READY
    clock.advance(60)  # the last hold has run out
    await crash(current)
    assert await pass_at(1.5) == []
    assert len(await pass_at(0.5)) == 1


async def test_a_drained_replica_exiting_is_no_crash() -> None:
    _clock, function, records, scheduler, nc, start = await one_replica_ordered()
    event = exit_event(start["replica_id"], function, exit_code=1, requested=True)
    await scheduler.observer.on_exit(event)
    assert records.replicas[start["replica_id"]].state == ReplicaState.STOPPED
    await scheduler.reconcile()  # replaced at once
    assert len(nc.ops("start")) == 2

"""The per-function decisions of kiln.scheduler.reconcile, with plain values: a new version
takes over from the old, a billing block stops new replicas, held starts wait, room is made
only from replicas that can spare it, and the replicas of deleted functions drain."""

from __future__ import annotations

import uuid

from scheduler_fakes import function_row

from kiln.db.enums import ReplicaState
from kiln.scheduler.cluster import TrackedReplica
from kiln.scheduler.reconcile import MIN_IDLE_TO_PREEMPT_S, orphans, room_for, scale, turnover
from kiln.scheduler.records import FunctionRow
from kiln.wire import ReplicaHeartbeat

NOW = 1_700_000_000.0


def replica(
    function: FunctionRow,
    replica_id: str,
    *,
    version: uuid.UUID | None = None,
    state: ReplicaState | None = ReplicaState.READY,
    in_flight: int = 0,
    idle_since: float | None = None,
    gpu: str = "none",
) -> TrackedReplica:
    version_id = str(version or function.version_id)
    tracked = TrackedReplica(
        replica_id, str(function.id), version_id, "n1", launched_at=0.0, startup_timeout_s=60,
        gpu=gpu,
    )  # fmt: skip
    if state is not None:
        tracked.beat = ReplicaHeartbeat(
            replica_id=replica_id, function_id=str(function.id), version_id=version_id,
            node_id="n1", state=state.value, in_flight=in_flight, idle_since=idle_since,
        )  # fmt: skip
    return tracked


def test_an_old_version_drains_once_the_new_one_is_ready_or_it_is_idle() -> None:
    function = function_row()
    old = uuid.uuid4()
    busy_old = replica(function, "busy-old", version=old, in_flight=1)
    idle_old = replica(function, "idle-old", version=old, idle_since=NOW)
    starting = replica(function, "new", state=ReplicaState.RESTORING)
    turn = turnover(function, [busy_old, idle_old, starting])
    assert [r.replica_id for r in turn.current] == ["new"]
    assert [r.replica_id for r in turn.retire] == ["idle-old"]  # the busy one finishes first
    assert turn.became_ready == []

    starting.beat = replica(function, "new").beat  # ready now
    turn = turnover(function, [busy_old, idle_old, starting])
    assert [r.replica_id for r in turn.retire] == ["busy-old", "idle-old"]
    assert turn.became_ready == [starting]
    starting.recorded_ready = True
    assert turnover(function, [starting]).became_ready == []


def test_draining_and_other_functions_replicas_are_not_current() -> None:
    function = function_row()
    draining = replica(function, "draining")
    draining.draining = True
    itself = replica(function, "self-draining", state=ReplicaState.DRAINING)
    other = replica(function_row(), "other")
    assert turnover(function, [draining, itself, other]).current == []


def test_held_starts_wait_but_the_plan_is_still_told() -> None:
    function = function_row()
    decision = scale(function, [], pending=3, now=NOW, held=True)
    assert (decision.plan.desired, decision.start) == (3, 0)
    assert scale(function, [], pending=3, now=NOW).start == 3


def test_a_billing_block_starts_nothing_and_drains_replicas_once_done() -> None:
    function = function_row(min_replicas=2, billing_block="balance")
    busy = replica(function, "busy", in_flight=1)
    idle = replica(function, "idle", idle_since=NOW - 1)
    assert scale(function, [busy, idle], pending=5, now=NOW).start == 0  # no more replicas
    # The calls already queued are served; then each replica stops once it has nothing to do,
    # min_replicas notwithstanding.
    assert scale(function, [busy, idle], pending=0, now=NOW).drain == ["idle"]


def test_room_is_made_from_the_longest_idle_replica_that_can_spare_it() -> None:
    waiting = function_row()
    spare_fn = function_row(min_replicas=1)
    long_idle = NOW - MIN_IDLE_TO_PREEMPT_S - 50
    a = replica(spare_fn, "a", idle_since=long_idle)
    b = replica(spare_fn, "b", idle_since=long_idle + 10)
    minimums = {str(spare_fn.id): 1}
    chosen = room_for(waiting, [a, b], pending={}, minimums=minimums, now=NOW)
    assert chosen is a
    # Never below its function's minimum, never one with calls waiting, never too fresh.
    assert room_for(waiting, [a], pending={}, minimums=minimums, now=NOW) is None
    assert room_for(waiting, [a, b], pending={spare_fn.id: 1}, minimums=minimums, now=NOW) is None
    fresh = replica(spare_fn, "fresh", idle_since=NOW - MIN_IDLE_TO_PREEMPT_S + 1)
    assert room_for(waiting, [a, fresh], pending={}, minimums={}, now=NOW) is a
    assert room_for(waiting, [fresh], pending={}, minimums={}, now=NOW) is None
    # Only a replica holding the same kind of slot makes room.
    gpu = replica(spare_fn, "gpu", idle_since=long_idle, gpu="H100")
    assert room_for(waiting, [gpu], pending={}, minimums={}, now=NOW) is None


def test_replicas_of_deleted_functions_are_orphans_until_told_to_drain() -> None:
    kept, deleted = function_row(), function_row()
    mine, gone = replica(kept, "mine"), replica(deleted, "gone")
    assert orphans([mine, gone], {kept.id: kept}) == [gone]
    gone.draining = True
    assert orphans([mine, gone], {kept.id: kept}) == []

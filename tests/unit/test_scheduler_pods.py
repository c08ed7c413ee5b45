"""The scheduler's decisions about pods and shells (kiln.scheduler.pods), with plain values,
and the reconcile loop acting on them (on a fake clock, with its rows in memory:
scheduler_fakes)."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from scheduler_fakes import (
    Records,
    exit_event,
    function_row,
    make_scheduler,
    node_beat,
    replica_beat,
)

from kiln._clock import FakeClock
from kiln.db.enums import PodKind, PodState, ReplicaState
from kiln.pods.idle import span, whole_span
from kiln.scheduler.cluster import TrackedReplica
from kiln.scheduler.pods import (
    ACTIVE_STEP_S,
    PodRow,
    broken_error,
    failed_error,
    idle_error,
    plan_pods,
)
from kiln.scheduler.reconcile import room_for, turnover
from kiln.scheduler.records import FunctionRow
from kiln.wire import ReplicaHeartbeat

FUNCTION = uuid.uuid4()
NOW = FakeClock().wall()
HOUR = 3600.0


def pod(kind: PodKind = PodKind.SHELL, *, launched: bool = False,
        state: PodState = PodState.STARTING, **fields: Any) -> PodRow:  # fmt: skip
    return PodRow(uuid.uuid4(), kind, state, FUNCTION, uuid.uuid4(), launched=launched, **fields)


def replica(replica_id: uuid.UUID, *, pod_id: uuid.UUID | None, state: ReplicaState,
            idle_since: float | None = 0.0, active_at: float | None = None,
            recorded_ready: bool = False) -> TrackedReplica:  # fmt: skip
    tracked = TrackedReplica(str(replica_id), str(FUNCTION), "v1", "n1", launched_at=0.0,
                             startup_timeout_s=60, recorded_ready=recorded_ready)  # fmt: skip
    tracked.beat = ReplicaHeartbeat(
        str(replica_id), str(FUNCTION), "v1", "n1", state.value, 0, idle_since,
        pod_id=str(pod_id) if pod_id else None, active_at=active_at,
    )  # fmt: skip
    tracked.last_seen = 0.0
    return tracked


def test_a_new_pod_starts_a_ready_one_runs_and_a_finished_shell_ends() -> None:
    new, starting, done = pod(), pod(launched=True), pod(launched=True, state=PodState.RUNNING)
    ready = replica(starting.replica_id, pod_id=starting.id, state=ReplicaState.READY)
    draining = replica(done.replica_id, pod_id=done.id, state=ReplicaState.DRAINING)
    replicas = {r.replica_id: r for r in (ready, draining)}
    plan = plan_pods([new, starting, done], replicas, blocked=frozenset(), judged=True, now=NOW)
    assert plan.start == [new]
    assert plan.ready == [(starting, ready)]
    assert plan.gone == [done]  # the shell's terminal ended: its replica drains itself
    assert plan.stop == []


def test_a_vanished_replica_ends_its_shell_only_once_the_adoption_window_passed() -> None:
    shell, machine = pod(launched=True), pod(PodKind.POD, launched=True)
    early = plan_pods([shell, machine], {}, blocked=frozenset(), judged=False, now=NOW)
    assert (early.start, early.gone) == ([], [])
    late = plan_pods([shell, machine], {}, blocked=frozenset(), judged=True, now=NOW)
    assert late.gone == [shell, machine]  # a shell ends; a pod starts again (records)


def test_replicas_of_pods_no_longer_active_stop_and_blocked_owners_run_nothing() -> None:
    ended = uuid.uuid4()
    orphan = replica(uuid.uuid4(), pod_id=ended, state=ReplicaState.READY)
    ordinary = replica(uuid.uuid4(), pod_id=None, state=ReplicaState.READY)
    blocked = pod(launched=True)
    held = replica(blocked.replica_id, pod_id=blocked.id, state=ReplicaState.READY)
    replicas = {r.replica_id: r for r in (orphan, ordinary, held)}
    plan = plan_pods([blocked], replicas, blocked=frozenset({FUNCTION}), judged=True, now=NOW)
    assert plan.blocked == [blocked]
    assert {r.replica_id for r in plan.stop} == {orphan.replica_id, held.replica_id}


def test_the_autoscaler_never_counts_drains_or_preempts_a_pods_replica() -> None:
    function = FunctionRow(
        id=FUNCTION, app="a", name="f", customer_id=uuid.uuid4(), version_id=uuid.uuid4(),
        generation=1, digest="d", entrypoint="a.py", spec={}, gpu="none", min_replicas=0,
        max_replicas=4, buffer_replicas=0, idle_timeout_s=1, target_concurrency=1,
        startup_timeout_s=60, timeout_s=60,
    )  # fmt: skip
    held = replica(uuid.uuid4(), pod_id=uuid.uuid4(), state=ReplicaState.READY)
    held.version_id = str(function.version_id)
    turn = turnover(function, [held])
    assert (turn.current, turn.retire) == ([], [])
    other = FunctionRow(**{**function.__dict__, "id": uuid.uuid4()})
    assert room_for(other, [held], pending={}, minimums={}, now=1e9) is None


# Failed starts ------------------------------------------------------------------------------


def test_a_failed_start_is_counted_at_once_and_the_third_in_a_row_stops_the_pod() -> None:
    why = "ModuleNotFoundError: No module named 'torch'"
    first = pod(PodKind.POD, launched=True, failure=why, name="box")
    third = dataclasses.replace(first, failures=2)
    shell = pod(launched=True, failure=why)
    vanished = pod(PodKind.POD, launched=True)  # no failure: only the window judges it
    plan = plan_pods([first, third, shell, vanished], {}, blocked=frozenset(), judged=False,
                     now=NOW)  # fmt: skip
    assert plan.failed == [first, shell]
    assert plan.broken == [third]
    assert (plan.gone, plan.start) == ([], [])
    assert failed_error(first) == (
        "its replica failed to start (1 in a row; at 3 it stops): ModuleNotFoundError: No "
        "module named 'torch'"
    )
    assert failed_error(shell) == (
        "its replica failed to start: ModuleNotFoundError: No module named 'torch'"
    )
    assert broken_error(third) == (
        "stopped after 3 failed starts in a row; the last: ModuleNotFoundError: No module "
        "named 'torch'; fix what it runs, then `kiln pods start box`"
    )


async def test_the_loop_restarts_a_failing_pod_twice_then_stops_it_and_ready_resets_it() -> None:
    clock = FakeClock()
    function = function_row()
    box = PodRow(uuid.uuid4(), PodKind.POD, PodState.STARTING, function.id, uuid.uuid4(),
                 launched=False, name="box")  # fmt: skip
    records = Records(functions={function.id: function}, pods={box.id: box})
    scheduler, nc = make_scheduler(clock, records)
    for attempt in (1, 2, 3):
        await scheduler.observer.on_node(node_beat("n1"))
        await scheduler.reconcile()
        started = nc.ops("start")[-1]["replica_id"]
        assert started == str(records.pods[box.id].replica_id)
        await scheduler.observer.on_exit(
            exit_event(started, function, exit_code=1, error="ImportError: no numpy")
        )
        await scheduler.reconcile()
        if attempt < 3:
            assert records.pods[box.id].failures == attempt
            assert records.pod_errors[box.id] == (
                f"its replica failed to start ({attempt} in a row; at 3 it stops): "
                "ImportError: no numpy"
            )
        clock.advance(60)  # past the crash-loop backoff, which holds the pod's starts too
    assert box.id in records.pods_stopped
    assert records.pod_errors[box.id] == (
        "stopped after 3 failed starts in a row; the last: ImportError: no numpy; fix what it "
        "runs, then `kiln pods start box`"
    )
    assert len(nc.ops("start")) == 3  # not started again

    # A start that became ready clears the count.
    again = dataclasses.replace(box, replica_id=uuid.uuid4(), failures=2)
    records.pods[box.id] = again
    await scheduler.observer.on_node(node_beat("n1"))
    await scheduler.reconcile()
    rid = nc.ops("start")[-1]["replica_id"]
    await scheduler.observer.on_replica(replica_beat(rid, function, pod_id=box.id))
    await scheduler.reconcile()
    assert (records.pods[box.id].state, records.pods[box.id].failures) == (PodState.RUNNING, 0)


# Traffic and auto-stop ----------------------------------------------------------------------


def running(**fields: Any) -> tuple[PodRow, TrackedReplica]:
    """A running pod of kind pod, and its ready replica that said `active_at`."""
    active_at = fields.pop("said", None)
    row = pod(PodKind.POD, launched=True, state=PodState.RUNNING, name="box", **fields)
    tracked = replica(row.replica_id, pod_id=row.id, state=ReplicaState.READY,
                      active_at=active_at, recorded_ready=True)  # fmt: skip
    return row, tracked


def test_a_pod_idle_for_its_auto_stop_s_stops_and_its_traffic_is_written_when_it_moved() -> None:
    row, tracked = running(said=NOW - HOUR, auto_stop_s=int(HOUR), active_at=NOW - HOUR)
    replicas = {tracked.replica_id: tracked}
    plan = plan_pods([row], replicas, blocked=frozenset(), judged=True, now=NOW - 1)
    assert (plan.idle, plan.active) == ([], [])  # a second to go; the row is current
    plan = plan_pods([row], replicas, blocked=frozenset(), judged=True, now=NOW)
    assert plan.idle == [row]
    assert idle_error(row) == (
        "stopped after 1 hour without terminal or port traffic (its auto_stop_hours); "
        "`kiln pods start box` starts it again"
    )
    # Its replica's word is written when it moved by ACTIVE_STEP_S, not at every beat.
    for said, written in (
        (NOW - HOUR + ACTIVE_STEP_S - 1, False),
        (NOW - HOUR + ACTIVE_STEP_S, True),
    ):
        row, tracked = running(said=said, active_at=NOW - HOUR)
        plan = plan_pods([row], {tracked.replica_id: tracked}, blocked=frozenset(), judged=True,
                         now=NOW)  # fmt: skip
        assert plan.active == ([(row, said)] if written else [])
        assert plan.idle == []  # no auto_stop_s: never stopped


def test_idle_counts_from_the_last_start_and_only_replicas_that_report_traffic_are_judged() -> None:
    # Restarted a minute ago after a day stopped: idle for a minute, not a day.
    row, tracked = running(said=NOW - 86_400, started_at=NOW - 60, auto_stop_s=3600)
    plan = plan_pods([row], {tracked.replica_id: tracked}, blocked=frozenset(), judged=True,
                     now=NOW)  # fmt: skip
    assert plan.idle == []
    # A replica that does not say when it had traffic (an older one) is never taken for idle.
    row, tracked = running(said=None, started_at=NOW - 86_400, auto_stop_s=60)
    plan = plan_pods([row], {tracked.replica_id: tracked}, blocked=frozenset(), judged=True,
                     now=NOW)  # fmt: skip
    assert (plan.idle, plan.active) == ([], [])
    # Shells have no auto-stop: they end with their terminal.
    shell = pod(launched=True, state=PodState.RUNNING, auto_stop_s=60)
    tracked = replica(shell.replica_id, pod_id=shell.id, state=ReplicaState.READY,
                      active_at=NOW - 86_400, recorded_ready=True)  # fmt: skip
    plan = plan_pods([shell], {tracked.replica_id: tracked}, blocked=frozenset(), judged=True,
                     now=NOW)  # fmt: skip
    assert (plan.idle, plan.active) == ([], [])


async def test_the_loop_stops_an_idle_pod_and_drains_its_replica() -> None:
    clock = FakeClock()
    function = function_row()
    box = PodRow(uuid.uuid4(), PodKind.POD, PodState.STARTING, function.id, uuid.uuid4(),
                 launched=False, name="box", auto_stop_s=7200)  # fmt: skip
    records = Records(functions={function.id: function}, pods={box.id: box})
    scheduler, nc = make_scheduler(clock, records)
    rid = str(box.replica_id)
    typed = clock.wall()  # its last keystroke

    async def beat_and_pass() -> None:
        await scheduler.observer.on_node(node_beat("n1"))
        beat = replica_beat(rid, function, pod_id=box.id, active_at=typed)
        await scheduler.observer.on_replica(beat)
        await scheduler.reconcile()

    await scheduler.observer.on_node(node_beat("n1"))
    await scheduler.reconcile()  # started
    await beat_and_pass()  # ready
    await beat_and_pass()  # its traffic written
    assert records.pods[box.id].active_at == typed
    clock.advance(7199)
    await beat_and_pass()
    assert box.id not in records.pods_stopped
    clock.advance(1)
    await beat_and_pass()
    assert records.pod_errors[box.id] == (
        "stopped after 2 hours without terminal or port traffic (its auto_stop_hours); "
        "`kiln pods start box` starts it again"
    )
    assert nc.ops("stop") == []
    await beat_and_pass()  # as after POST /stop: its replica drains, its volume stays
    assert nc.ops("stop") == [{"op": "stop", "replica_id": rid, "grace_s": 10.0}]


def test_spans_read_in_the_unit_they_fill() -> None:
    assert [span(s) for s in (4, 1, 90, 3600, 5400, 7200)] == [
        "4 seconds", "1 second", "1.5 minutes", "1 hour", "1.5 hours", "2 hours"
    ]  # fmt: skip
    assert [whole_span(s) for s in (13_200, 3599, 61, 0.5)] == [
        "3 hours", "59 minutes", "1 minute", "0 seconds"
    ]  # fmt: skip

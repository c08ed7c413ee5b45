"""The scheduler's decisions about pods and shells (kiln.scheduler.pods), with plain values."""

from __future__ import annotations

import uuid

from kiln.db.enums import PodKind, PodState, ReplicaState
from kiln.scheduler.cluster import TrackedReplica
from kiln.scheduler.pods import PodRow, plan_pods
from kiln.scheduler.reconcile import room_for, turnover
from kiln.scheduler.records import FunctionRow
from kiln.wire import ReplicaHeartbeat

FUNCTION = uuid.uuid4()


def pod(kind: PodKind = PodKind.SHELL, *, launched: bool = False,
        state: PodState = PodState.STARTING) -> PodRow:  # fmt: skip
    return PodRow(uuid.uuid4(), kind, state, FUNCTION, uuid.uuid4(), launched=launched)


def replica(replica_id: uuid.UUID, *, pod_id: uuid.UUID | None, state: ReplicaState,
            idle_since: float | None = 0.0) -> TrackedReplica:  # fmt: skip
    tracked = TrackedReplica(str(replica_id), str(FUNCTION), "v1", "n1", launched_at=0.0,
                             startup_timeout_s=60)  # fmt: skip
    tracked.beat = ReplicaHeartbeat(
        str(replica_id), str(FUNCTION), "v1", "n1", state.value, 0, idle_since,
        pod_id=str(pod_id) if pod_id else None,
    )  # fmt: skip
    tracked.last_seen = 0.0
    return tracked


def test_a_new_pod_starts_a_ready_one_runs_and_a_finished_shell_ends() -> None:
    new, starting, done = pod(), pod(launched=True), pod(launched=True, state=PodState.RUNNING)
    ready = replica(starting.replica_id, pod_id=starting.id, state=ReplicaState.READY)
    draining = replica(done.replica_id, pod_id=done.id, state=ReplicaState.DRAINING)
    replicas = {r.replica_id: r for r in (ready, draining)}
    plan = plan_pods([new, starting, done], replicas, blocked=frozenset(), judged=True)
    assert plan.start == [new]
    assert plan.ready == [(starting, ready)]
    assert plan.gone == [done]  # the shell's terminal ended: its replica drains itself
    assert plan.stop == []


def test_a_vanished_replica_ends_its_shell_only_once_the_adoption_window_passed() -> None:
    shell, machine = pod(launched=True), pod(PodKind.POD, launched=True)
    early = plan_pods([shell, machine], {}, blocked=frozenset(), judged=False)
    assert (early.start, early.gone) == ([], [])
    late = plan_pods([shell, machine], {}, blocked=frozenset(), judged=True)
    assert late.gone == [shell, machine]  # a shell ends; a pod starts again (records)


def test_replicas_of_pods_no_longer_active_stop_and_blocked_owners_run_nothing() -> None:
    ended = uuid.uuid4()
    orphan = replica(uuid.uuid4(), pod_id=ended, state=ReplicaState.READY)
    ordinary = replica(uuid.uuid4(), pod_id=None, state=ReplicaState.READY)
    blocked = pod(launched=True)
    held = replica(blocked.replica_id, pod_id=blocked.id, state=ReplicaState.READY)
    replicas = {r.replica_id: r for r in (orphan, ordinary, held)}
    plan = plan_pods([blocked], replicas, blocked=frozenset({FUNCTION}), judged=True)
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

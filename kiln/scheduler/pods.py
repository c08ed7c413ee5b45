"""Pods and shells in the reconcile loop: each active pod (`kiln.db.models_pods`) has one
replica of its function, started with the replica id its row names, and the autoscaler never
counts, drains or preempts it.

`plan_pods` is a pure decision, like the rest of `kiln.scheduler.reconcile`: which pods to
start, which became ready, which ended (a shell's replica finished its terminal or died; a
pod's died and starts again), and which replicas belong to pods that are no longer active.
A replica the scheduler does not track is taken for gone only once the adoption window has
passed (`judged`), or when its row says it failed: after a restart or a takeover, a live one
says hello within it.

And a pod's two policies: it stops once its replicas failed to start `MAX_POD_FAILURES` times
in a row (a broken environment is not restarted for ever), and once it had no terminal or
port traffic for its `auto_stop_s` (its replica's heartbeats say when it last had some; the
row keeps that time, written only when it moved by `ACTIVE_STEP_S`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kiln.db.enums import PodKind, PodState
from kiln.pods.idle import span
from kiln.scheduler.cluster import TrackedReplica

__all__ = [
    "ACTIVE_STEP_S",
    "MAX_POD_FAILURES",
    "PodPlan",
    "PodRow",
    "broken_error",
    "failed_error",
    "idle_error",
    "plan_pods",
]

MAX_POD_FAILURES = 3  # failed starts in a row that stop a pod
# The row's `active_at` is rewritten when the replica's word moved by this much: often enough
# for idle reminders and auto-stops counted in hours, rarely enough not to write every beat.
ACTIVE_STEP_S = 60.0


@dataclass(frozen=True)
class PodRow:
    """An active pod as the scheduler sees it."""

    id: uuid.UUID
    kind: PodKind
    state: PodState
    function_id: uuid.UUID
    replica_id: uuid.UUID
    launched: bool  # its current replica was ordered (its row names the node)
    gpu: str | None = None  # its own GPU request, instead of its function's
    volume_gb: int = 0
    volume_node: str | None = None  # where its volume lives: its replicas start there
    requirements: tuple[str, ...] = ()  # Python requirements its node installs for it
    volume_key: str | None = None  # its volume's copy parked in the store (pod_volumes)
    image: str | None = None  # a container image it runs (on nodes with Docker)
    name: str = ""
    # Its current replica ended without ever being ready, and why (its row's error): a failed
    # start. None while it runs, or when it ended otherwise.
    failure: str | None = None
    failures: int = 0  # failed starts in a row before the current replica
    auto_stop_s: int | None = None
    started_at: float | None = None  # epoch seconds: its replica became ready
    active_at: float | None = None  # epoch seconds: its last traffic, as the row has it

    @property
    def shell(self) -> bool:
        return self.kind == PodKind.SHELL


@dataclass(frozen=True)
class PodPlan:
    start: list[PodRow] = field(default_factory=list)  # launch its replica now
    ready: list[tuple[PodRow, TrackedReplica]] = field(default_factory=list)  # now running
    gone: list[PodRow] = field(default_factory=list)  # its replica ended: a shell ends
    # Its replica failed to start: a shell ends, a pod tries again (one more failure)...
    failed: list[PodRow] = field(default_factory=list)
    # ... unless that was its MAX_POD_FAILURES-th in a row: it stops, saying why.
    broken: list[PodRow] = field(default_factory=list)
    idle: list[PodRow] = field(default_factory=list)  # no traffic for its auto_stop_s: it stops
    active: list[tuple[PodRow, float]] = field(default_factory=list)  # new last traffic to write
    blocked: list[PodRow] = field(default_factory=list)  # its owner may not run anything
    stop: list[TrackedReplica] = field(default_factory=list)  # no active pod holds it


def plan_pods(
    pods: Iterable[PodRow],
    replicas: Mapping[str, TrackedReplica],
    *,
    blocked: frozenset[uuid.UUID],
    judged: bool,
    now: float,
) -> PodPlan:
    """`blocked`: functions whose owner billing blocks; `judged`: an untracked replica is
    gone (the adoption window has passed); `now`: epoch seconds."""
    plan = PodPlan()
    held: set[str] = set()
    for pod in pods:
        replica_id = str(pod.replica_id)
        tracked = replicas.get(replica_id)
        if pod.function_id in blocked:
            plan.blocked.append(pod)
            continue
        if tracked is None:
            if not pod.launched:
                plan.start.append(pod)
            elif pod.failure is not None:  # its row says so: no need to wait for the window
                again = pod.shell or pod.failures + 1 < MAX_POD_FAILURES
                (plan.failed if again else plan.broken).append(pod)
            elif judged:
                plan.gone.append(pod)
            continue
        held.add(replica_id)
        if pod.shell and not tracked.serving:
            plan.gone.append(pod)  # the shell's terminal ended: its replica is on its way out
        elif tracked.ready and (pod.state == PodState.STARTING or not tracked.recorded_ready):
            plan.ready.append((pod, tracked))
        elif tracked.ready and not pod.shell:
            _judge_traffic(pod, tracked, now, plan)
    plan.stop.extend(
        tracked
        for replica_id, tracked in replicas.items()
        if tracked.pod_id is not None and replica_id not in held and not tracked.draining
    )
    return plan


def _judge_traffic(pod: PodRow, tracked: TrackedReplica, now: float, plan: PodPlan) -> None:
    """A running pod's last traffic: written when it moved on, and the pod stopped once that
    is older than its auto_stop_s. Only a replica that reports its traffic is judged: one that
    says nothing is never taken for idle."""
    said = tracked.beat.active_at if tracked.beat is not None else None
    if said is None:
        return
    if pod.active_at is None or said - pod.active_at >= ACTIVE_STEP_S:
        plan.active.append((pod, said))
    # Idle since its last traffic, and never since before it last became ready.
    since = max(said, pod.started_at or said)
    if pod.auto_stop_s is not None and now - since >= pod.auto_stop_s:
        plan.idle.append(pod)


# What a pod's `error` says when the scheduler stopped or restarted it (GET /v1/pods/ID).


def failed_error(pod: PodRow) -> str:
    """Its replica failed to start (`pod.failure`): a shell ended, a pod starts again."""
    if pod.shell:
        return f"its replica failed to start: {pod.failure}"
    return (
        f"its replica failed to start ({pod.failures + 1} in a row; at {MAX_POD_FAILURES} it "
        f"stops): {pod.failure}"
    )


def broken_error(pod: PodRow) -> str:
    return (
        f"stopped after {MAX_POD_FAILURES} failed starts in a row; the last: {pod.failure}; "
        f"fix what it runs, then `kiln pods start {pod.name}`"
    )


def idle_error(pod: PodRow) -> str:
    return (
        f"stopped after {span(pod.auto_stop_s or 0)} without terminal or port traffic (its "
        f"auto_stop_hours); `kiln pods start {pod.name}` starts it again"
    )

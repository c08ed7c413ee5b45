"""Pods and shells in the reconcile loop: each active pod (`kiln.db.models_pods`) has one
replica of its function, started with the replica id its row names, and the autoscaler never
counts, drains or preempts it.

`plan_pods` is a pure decision, like the rest of `kiln.scheduler.reconcile`: which pods to
start, which became ready, which ended (a shell's replica finished its terminal or died; a
pod's died and starts again), and which replicas belong to pods that are no longer active.
A replica the scheduler does not track is taken for gone only once the adoption window has
passed (`judged`): after a restart or a takeover, a live one says hello within it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kiln.db.enums import PodKind, PodState
from kiln.scheduler.cluster import TrackedReplica

__all__ = ["PodPlan", "PodRow", "plan_pods"]


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

    @property
    def shell(self) -> bool:
        return self.kind == PodKind.SHELL


@dataclass(frozen=True)
class PodPlan:
    start: list[PodRow] = field(default_factory=list)  # launch its replica now
    ready: list[tuple[PodRow, TrackedReplica]] = field(default_factory=list)  # now running
    gone: list[PodRow] = field(default_factory=list)  # its replica ended: a shell ends
    blocked: list[PodRow] = field(default_factory=list)  # its owner may not run anything
    stop: list[TrackedReplica] = field(default_factory=list)  # no active pod holds it


def plan_pods(
    pods: Iterable[PodRow],
    replicas: Mapping[str, TrackedReplica],
    *,
    blocked: frozenset[uuid.UUID],
    judged: bool,
) -> PodPlan:
    """`blocked`: functions whose owner billing blocks; `judged`: an untracked replica is
    gone (the adoption window has passed)."""
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
            elif judged:
                plan.gone.append(pod)
            continue
        held.add(replica_id)
        if pod.shell and not tracked.serving:
            plan.gone.append(pod)  # the shell's terminal ended: its replica is on its way out
        elif tracked.ready and (pod.state == PodState.STARTING or not tracked.recorded_ready):
            plan.ready.append((pod, tracked))
    plan.stop.extend(
        tracked
        for replica_id, tracked in replicas.items()
        if tracked.pod_id is not None and replica_id not in held and not tracked.draining
    )
    return plan

"""The scheduler's decisions, as pure functions of what it observed (`ClusterView`), the deployed
functions and the time it is. No I/O and no clock of their own: `kiln.scheduler.scheduler`
calls them once per pass and `kiln.scheduler.act` carries their answers out, so each rule is
tested with plain values and a fake clock, not by waiting on a cluster.

- `judge_silence`: nodes that stopped heartbeating are lost; replicas that stopped are lost
  (their usage closed when their node went with them: while their node is quiet too, its
  verdict comes first); replicas never ready within their `startup_timeout` are failed.
  Nothing is judged until the scheduler has itself listened for a whole timeout, so its own
  NATS outage does not read as everyone's.
- `turnover`: the function's current-version replicas, older ones to drain, and ones that
  just became ready.
- `scale`: how many to start or which idle ones to drain (`kiln.scheduler.policy.plan`), with
  starts held during a crash-loop backoff or a takeover's settling.
- `room_for`: an idle replica of another function to drain when nothing fits.
- `orphans`: replicas of functions that are gone.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kiln.scheduler.cluster import ClusterView, TrackedReplica
from kiln.scheduler.policy import Plan, ReplicaView, plan
from kiln.scheduler.records import FunctionRow
from kiln.wire import HEARTBEAT_INTERVAL_S, REPLICA_LOST_AFTER_S

__all__ = [
    "ADOPTION_WINDOW_S",
    "MIN_IDLE_TO_PREEMPT_S",
    "TAKEOVER_SETTLE_S",
    "LostReplica",
    "Scale",
    "Silence",
    "Turnover",
    "judge_silence",
    "orphans",
    "room_for",
    "scale",
    "turnover",
]

# After a (re)start or takeover, live rows of replicas that have not heartbeated within this
# time are gone: they died with an earlier scheduler's world.
ADOPTION_WINDOW_S = 2 * REPLICA_LOST_AFTER_S
# A new leader waits this long before starting replicas: two heartbeats of every live one, so
# a replica its predecessor ordered just before dying says hello before a second is ordered.
TAKEOVER_SETTLE_S = 2 * HEARTBEAT_INTERVAL_S
# A node silent this long may be dying: the verdict on its silent replicas waits for its own.
_NODE_QUIET_S = 2 * HEARTBEAT_INTERVAL_S
# Room is made only from replicas idle at least this long, so busy functions do not thrash.
MIN_IDLE_TO_PREEMPT_S = 10.0


@dataclass(frozen=True)
class LostReplica:
    replica: TrackedReplica
    node_gone: bool  # its node is lost too: its agent cannot close its billable time


@dataclass(frozen=True)
class Silence:
    nodes: list[str] = field(default_factory=list)  # newly lost
    unready: list[TrackedReplica] = field(default_factory=list)  # past startup_timeout
    replicas: list[LostReplica] = field(default_factory=list)


def judge_silence(cluster: ClusterView, *, now: float) -> Silence:
    """Who has been silent too long at `now` (monotonic)."""
    # Heartbeats missed while the scheduler's own link was down say nothing about the senders.
    if now - cluster.deaf_at < REPLICA_LOST_AFTER_S:
        return Silence()
    nodes = [
        node_id
        for node_id, seen in cluster.nodes.items()
        if now - seen.at > REPLICA_LOST_AFTER_S and node_id not in cluster.lost_nodes
    ]
    gone = cluster.lost_nodes.union(nodes)
    unready: list[TrackedReplica] = []
    lost: list[LostReplica] = []
    for tracked in cluster.replicas.values():
        age = now - tracked.launched_at
        if tracked.starting and age > tracked.startup_timeout_s:
            unready.append(tracked)  # alive but never ready (a hung import or @enter)
            continue
        if tracked.last_seen is None:
            if age < tracked.startup_timeout_s:
                continue  # never heard from: allowed its startup time first
        elif now - tracked.last_seen < REPLICA_LOST_AFTER_S:
            continue
        node = cluster.nodes.get(tracked.node_id)
        if tracked.node_id not in gone and node is not None and now - node.at > _NODE_QUIET_S:
            # Its node is quiet too: the node's verdict comes first (within a few beats), so
            # that a replica that died with its host has its usage closed with it.
            continue
        lost.append(LostReplica(tracked, node_gone=tracked.node_id in gone))
    return Silence(nodes, unready, lost)


@dataclass(frozen=True)
class Turnover:
    current: list[TrackedReplica]  # serving replicas of the current version
    retire: list[TrackedReplica]  # replicas of older versions to drain now
    became_ready: list[TrackedReplica]  # current ones ready since the last pass


def turnover(function: FunctionRow, replicas: Iterable[TrackedReplica]) -> Turnover:
    """Old versions drain once idle or once a replica of the current version is ready (a drain
    finishes what it holds); new replicas take the demand."""
    # A pod's replica is its own (kiln.scheduler.pods): never counted, retired or drained here.
    mine = [r for r in replicas if r.function_id == str(function.id) and r.pod_id is None]
    version = str(function.version_id)
    current = [r for r in mine if r.version_id == version and r.serving]
    current_ready = any(r.ready for r in current)
    retire = [
        r
        for r in mine
        if r.version_id != version
        and not r.draining
        and (current_ready or r.beat is None or r.beat.in_flight == 0)
    ]
    became_ready = [r for r in current if r.ready and not r.recorded_ready]
    return Turnover(current, retire, became_ready)


@dataclass(frozen=True)
class Scale:
    plan: Plan
    start: int  # replicas to start now: the plan's, or 0 while starts are held
    drain: list[str]  # idle replicas to drain now


def scale(
    function: FunctionRow,
    current: list[TrackedReplica],
    *,
    pending: int,
    now: float,
    held: bool = False,
) -> Scale:
    """One function's decision: `current` as `turnover` found it, `pending` its queue, `now`
    epoch seconds (the clock of the replicas' `idle_since`), `held` whether starts wait (a
    crash-loop backoff, a takeover settling)."""
    views = [
        ReplicaView(
            r.replica_id,
            r.beat.in_flight if r.beat else 0,
            r.beat.idle_since if r.beat else None,
            ready=r.ready,
        )
        for r in current
    ]
    scaling = (
        function.scaling
        if function.billing_block is None
        else function.blocked_scaling(len(current))
    )
    decision = plan(scaling, views, pending=pending, now=now)
    return Scale(decision, 0 if held else decision.start, decision.drain)


def room_for(
    function: FunctionRow,
    replicas: Iterable[TrackedReplica],
    *,
    pending: Mapping[uuid.UUID, int],
    minimums: Mapping[str, int],
    now: float,
) -> TrackedReplica | None:
    """Nothing fits `function`: the replica of another function idle longest, if it takes the
    same kind of slot, its function has nothing waiting and keeps its minimum without it, so
    waiting demand does not starve behind replicas that only wait for their idle timeout.
    `now` is epoch seconds."""
    replicas = [r for r in replicas if r.pod_id is None]  # a pod holds its slot
    live: dict[str, int] = {}
    for tracked in replicas:
        if tracked.serving:
            live[tracked.function_id] = live.get(tracked.function_id, 0) + 1
    candidates = [
        t for t in replicas
        if t.serving and t.function_id != str(function.id) and t.gpu == function.gpu
        and t.ready and t.beat is not None
        and t.beat.in_flight == 0 and t.beat.idle_since is not None
        and now - t.beat.idle_since >= MIN_IDLE_TO_PREEMPT_S
        and not pending.get(uuid.UUID(t.function_id))
        and live[t.function_id] > minimums.get(t.function_id, 0)
    ]  # fmt: skip
    if not candidates:
        return None
    return min(candidates, key=lambda t: (t.beat.idle_since or 0.0) if t.beat else 0.0)


def orphans(
    replicas: Iterable[TrackedReplica], functions: Mapping[uuid.UUID, FunctionRow]
) -> list[TrackedReplica]:
    """Replicas of functions that no longer exist (app deleted, function removed), not yet
    told to drain."""
    return [r for r in replicas if uuid.UUID(r.function_id) not in functions and not r.draining]

"""Lost nodes and replicas, on a fake clock: a node that stops heartbeating is declared lost
after REPLICA_LOST_AFTER_S and not before, its replicas are written off with their usage closed
up to the node's last heartbeat, and replacements start on the nodes that remain. Silence heard
while the scheduler itself was cut off from NATS proves nothing."""

from __future__ import annotations

import uuid
from typing import Any, cast

import pytest
from scheduler_fakes import (
    KEY,
    SUBJECTS,
    Nats,
    Records,
    make_scheduler,
    node_beat,
    one_replica_ordered,
    replica_beat,
)

from kiln._clock import FakeClock
from kiln.db.enums import NodeState, ReplicaState
from kiln.metering import USAGE_INTERVAL_S, close_lost_usage
from kiln.scheduler.cluster import ClusterView, TrackedReplica
from kiln.scheduler.reconcile import Silence, judge_silence
from kiln.wire import REPLICA_LOST_AFTER_S, NodeHeartbeat, ReplicaHeartbeat, StartReplica

# Pure: judge_silence -------------------------------------------------------------------------


def beat(state: ReplicaState = ReplicaState.READY) -> ReplicaHeartbeat:
    return ReplicaHeartbeat(
        replica_id="r", function_id="f", version_id="v", node_id="n1", state=state.value,
        in_flight=0, idle_since=None,
    )  # fmt: skip


def cluster_at(now: float) -> ClusterView:
    cluster = ClusterView()
    node = NodeHeartbeat(node_id="n1", hostname="h", slots={"none": 1}, free={"none": 1})
    cluster.hear_node(node, now=now, wall=now)
    return cluster


def tracked(
    replica_id: str, *, launched_at: float, seen: float | None, state: ReplicaState | None = None
) -> TrackedReplica:
    replica = TrackedReplica(
        replica_id, "f", "v", "n1", launched_at=launched_at, startup_timeout_s=30
    )
    if seen is not None:
        replica.beat, replica.last_seen = beat(state or ReplicaState.READY), seen
    return replica


def test_a_node_is_lost_only_once_silent_for_longer_than_the_timeout() -> None:
    cluster = cluster_at(100.0)
    assert judge_silence(cluster, now=100.0 + REPLICA_LOST_AFTER_S).nodes == []
    assert judge_silence(cluster, now=100.0 + REPLICA_LOST_AFTER_S + 0.01).nodes == ["n1"]
    cluster.lost_nodes.add("n1")  # declared: not again
    assert judge_silence(cluster, now=200.0).nodes == []


def test_silent_replicas_are_lost_and_know_whether_their_node_went_too() -> None:
    cluster = cluster_at(100.0)
    cluster.replicas["quiet"] = tracked("quiet", launched_at=90.0, seen=100.0)
    cluster.replicas["talking"] = tracked("talking", launched_at=90.0, seen=103.5)
    silence = judge_silence(cluster, now=104.0)
    assert [(lost.replica.replica_id, lost.node_gone) for lost in silence.replicas] == [
        ("quiet", True)  # the node went silent at the same time: nobody closes its usage
    ]
    cluster.hear_node(cluster.nodes["n1"].beat, now=103.9, wall=103.9)
    assert [lost.node_gone for lost in judge_silence(cluster, now=104.0).replicas] == [False]


def test_a_replica_whose_node_is_quiet_too_waits_for_the_nodes_verdict() -> None:
    """Replica and node heartbeats tick apart: a replica that died with its host may fall
    silent up to a beat before the host does. Judged first, its usage would never be closed."""
    cluster = cluster_at(100.9)
    cluster.replicas["r"] = tracked("r", launched_at=90.0, seen=100.0)
    assert judge_silence(cluster, now=103.6) == Silence()  # the node has been quiet 2.7 s
    silence = judge_silence(cluster, now=104.5)
    assert silence.nodes == ["n1"]
    assert [(lost.replica.replica_id, lost.node_gone) for lost in silence.replicas] == [("r", True)]


def test_a_replica_never_heard_from_has_its_startup_timeout_first() -> None:
    cluster = cluster_at(100.0)
    cluster.replicas["new"] = tracked("new", launched_at=100.0, seen=None)
    cluster.hear_node(cluster.nodes["n1"].beat, now=129.0, wall=129.0)
    assert judge_silence(cluster, now=129.0).replicas == []
    assert [lost.replica.replica_id for lost in judge_silence(cluster, now=130.0).replicas] == [
        "new"
    ]


def test_a_replica_that_heartbeats_but_never_gets_ready_fails_after_its_startup_timeout() -> None:
    cluster = cluster_at(100.0)
    cluster.replicas["hung"] = tracked(
        "hung", launched_at=100.0, seen=130.0, state=ReplicaState.RESTORING
    )
    assert judge_silence(cluster, now=130.0).unready == []
    silence = judge_silence(cluster, now=130.5)
    assert [r.replica_id for r in silence.unready] == ["hung"]
    assert silence.replicas == []


def test_nothing_is_judged_until_the_scheduler_has_listened_for_a_whole_timeout() -> None:
    cluster = cluster_at(100.0)
    cluster.replicas["r"] = tracked("r", launched_at=90.0, seen=100.0)
    cluster.deaf_at = 110.0  # its own NATS link was down then
    assert judge_silence(cluster, now=110.0 + REPLICA_LOST_AFTER_S - 0.01).nodes == []
    late = judge_silence(cluster, now=110.0 + REPLICA_LOST_AFTER_S)
    assert (late.nodes, len(late.replicas)) == (["n1"], 1)


# The scheduler: observe, reconcile and act around a lost node --------------------------------


async def test_a_lost_node_is_recorded_its_replicas_written_off_and_replaced_elsewhere() -> None:
    clock, function, records, scheduler, nc, start = await one_replica_ordered()
    replica_id, started_at = start["replica_id"], clock.wall()
    [(node_id, _)] = nc.commands
    other = "n2" if node_id == "n1" else "n1"
    await scheduler.observer.on_node(node_beat(other))

    # 12 s of heartbeats from everyone: the replica is ready and billed in 5 s intervals, of
    # which the ledger has the first.
    for _ in range(12):
        clock.advance(1)
        await scheduler.observer.on_node(node_beat(node_id))
        await scheduler.observer.on_node(node_beat(other))
        await scheduler.observer.on_replica(replica_beat(replica_id, function, node_id=node_id))
        await scheduler.reconcile()
    records.charged[replica_id] = {1}
    assert records.replicas[replica_id].state == ReplicaState.READY
    assert len(nc.ops("start")) == 1
    last_heard = clock.wall()

    # Then the node and its replica go quiet; the other node goes on.
    for _ in range(3):
        clock.advance(1)
        await scheduler.observer.on_node(node_beat(other))
        await scheduler.reconcile()
    clock.advance(REPLICA_LOST_AFTER_S - 3)  # exactly the timeout: not yet
    await scheduler.observer.on_node(node_beat(other))
    await scheduler.reconcile()
    assert records.nodes[node_id] == NodeState.READY
    assert replica_id in scheduler.cluster.replicas
    assert nc.usage == []

    clock.advance(0.1)
    await scheduler.observer.on_node(node_beat(other))
    await scheduler.reconcile()
    assert records.nodes == {node_id: NodeState.LOST, other: NodeState.READY}
    assert (records.replicas[replica_id].state, records.replicas[replica_id].stopped) == (
        ReplicaState.LOST,
        True,
    )
    assert replica_id not in scheduler.cluster.replicas
    assert {"op": "stop", "replica_id": replica_id, "grace_s": 0} in nc.ops("stop")
    # Its usage is closed by the scheduler, up to the node's last heartbeat: the intervals the
    # ledger lacks, the last one cut short and final.
    assert [r.event_id for r in nc.usage] == [f"{replica_id}:2", f"{replica_id}:3"]
    assert nc.usage[0].period_start == started_at + USAGE_INTERVAL_S
    assert (nc.usage[-1].period_end, nc.usage[-1].final) == (last_heard, True)
    # min_replicas=1: a replacement, on the node that is left.
    [_, replacement] = nc.ops("start")
    assert [n for n, c in nc.commands if c is replacement] == [other]
    assert uuid.UUID(replacement["replica_id"]) != uuid.UUID(replica_id)
    assert scheduler.scheduling.nodes_lost._value.get() == 1

    # The node comes back: ready again, and placeable.
    await scheduler.observer.on_node(node_beat(node_id))
    assert records.nodes[node_id] == NodeState.READY
    assert node_id not in scheduler.cluster.lost_nodes


async def test_a_scheduler_cut_off_from_nats_does_not_declare_the_cluster_lost() -> None:
    clock = FakeClock()
    records = Records()
    scheduler, nc = make_scheduler(clock, records)
    await scheduler.observer.on_node(node_beat("n1"))
    nc.is_connected = False
    clock.advance(10)  # nothing heard: its own link is down
    await scheduler.reconcile()
    nc.is_connected = True
    clock.advance(1)
    await scheduler.reconcile()  # back, but it has not listened for a whole timeout yet
    assert records.nodes == {"n1": NodeState.READY}
    clock.advance(REPLICA_LOST_AFTER_S)
    await scheduler.reconcile()  # it has listened long enough, and heard nothing
    assert records.nodes == {"n1": NodeState.LOST}


# Closing a lost replica's usage (kiln.metering) ----------------------------------------------


async def test_usage_is_not_closed_for_a_replica_whose_billable_start_is_unknown() -> None:
    clock = FakeClock()
    nc = Nats(clock)

    async def charged(replica_id: str) -> set[int]:
        raise AssertionError("not asked: nothing to close")

    for launch in (None, start_order(received_at=0.0)):  # adopted; or never taken by an agent
        written = await close_lost_usage(
            cast(Any, nc), SUBJECTS, launch, ended=clock.wall(), charged=charged, secret=KEY
        )
        assert written == 0
    assert nc.usage == []


async def test_a_failure_to_close_usage_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    launch = start_order(received_at=clock.wall() - 12)

    async def charged(replica_id: str) -> set[int]:
        raise ConnectionError("the database is away")

    written = await close_lost_usage(
        cast(Any, Nats(clock)), SUBJECTS, launch, ended=clock.wall(), charged=charged, secret=KEY
    )
    assert written == 0
    assert f"could not close the usage of lost replica {launch.replica_id}" in caplog.text


def start_order(*, received_at: float) -> StartReplica:
    return StartReplica(
        replica_id=str(uuid.uuid4()), function_id=str(uuid.uuid4()), version_id="v",
        generation=1, app="app", function="fn", artifact_digest="d", entrypoint="app.py",
        spec={}, gpu_type="none", gpu_count=0, received_at=received_at,
    )  # fmt: skip

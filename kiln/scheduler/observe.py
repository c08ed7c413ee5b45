"""What the scheduler hears, turned into its `ClusterView`: node and replica heartbeats, node
agents' exit events, routers' demand hints, replicas' cold-start reports, and the depth of each
function's queue (JetStream consumer info).

Every message is taken for what it says only under its seal (kiln.seal): the platform's for
node beats, exits and hints, the function's own for what a replica sends, which must also name
a replica of that function. A heartbeat from a replica this scheduler did not start (it
restarted, or took over from another leader) is adopted when its row says it is live, as its
row describes it: the beat is the replica's word, and a replica runs customers' code.

Observing writes only what it heard (a node's row, a replica's exit and origin); deciding is
`kiln.scheduler.reconcile`'s job. Standby schedulers observe too, so a new leader starts
current.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from kiln._clock import Clock
from kiln.db.enums import ReplicaState
from kiln.observability.coldstart import ColdStartMetrics
from kiln.scheduler.backoff import CrashLoops, crashed
from kiln.scheduler.cluster import ClusterView, TrackedReplica
from kiln.scheduler.records import ClusterRecords
from kiln.seal import Seals
from kiln.wire import (
    ColdStartReport,
    NodeHeartbeat,
    Origin,
    ProcessOrigin,
    ReplicaHeartbeat,
    Subjects,
    decode,
    decode_own,
)

__all__ = ["ADOPTED_STARTUP_TIMEOUT_S", "Observer"]

_log = logging.getLogger("kiln.scheduler")
# An adopted replica's function settings are not read for it: the most a function may take.
ADOPTED_STARTUP_TIMEOUT_S = 600.0


class Observer:
    def __init__(
        self,
        cluster: ClusterView,
        records: ClusterRecords,
        *,
        seals: Seals,
        clock: Clock,
        crash_loops: CrashLoops,
        metrics: ColdStartMetrics,
        wake: asyncio.Event,
    ) -> None:
        self.cluster = cluster
        self.records = records
        self.seals = seals
        self.clock = clock
        self.crash_loops = crash_loops
        self.metrics = metrics
        self.wake = wake  # set when a pass should run now rather than at its period

    async def subscribe(self, nc: NATS, subjects: Subjects) -> list[Subscription]:
        return [
            await nc.subscribe(subjects.all_demand, cb=self.on_demand),
            await nc.subscribe(subjects.all_replica_heartbeats, cb=self.on_replica),
            await nc.subscribe(subjects.all_node_heartbeats, cb=self.on_node),
            await nc.subscribe(subjects.replica_events, cb=self.on_exit),
            await nc.subscribe(subjects.all_cold_starts, cb=self.on_cold_start),
        ]

    async def on_demand(self, msg: Msg) -> None:
        if not self.seals.platform_sent(msg, "a demand hint"):
            return
        try:
            function_id = uuid.UUID(hex=msg.subject.rsplit(".", 1)[-1])
        except ValueError:
            pass
        else:
            self.cluster.demand_at.setdefault(function_id, self.clock.wall())
            self.cluster.hinted.add(function_id)
        self.wake.set()

    async def on_node(self, msg: Msg) -> None:
        if not self.seals.platform_sent(msg, "a node heartbeat"):
            return
        beat = decode(NodeHeartbeat, msg.data)
        if not self.cluster.knows_node(beat.node_id):
            # Recorded before it can be chosen: replica rows refer to their node (and a node
            # heard again is ready again).
            await self.records.record_node(beat)
            self.wake.set()
        self.cluster.hear_node(beat, now=self.clock.monotonic(), wall=self.clock.wall())

    async def on_replica(self, msg: Msg) -> None:
        try:
            beat = decode_own(ReplicaHeartbeat, msg.subject, msg.data)
            function_id = uuid.UUID(beat.function_id)
        except (ValueError, TypeError):
            _log.warning("ignoring an unreadable replica heartbeat on %s", msg.subject)
            return
        # Sealed by a replica of the function it names, which must be the replica's own (a
        # replica could seal a beat naming another function's replica).
        if not self.seals.function_sent(msg, function_id, "a replica heartbeat"):
            return
        tracked = self.cluster.replicas.get(beat.replica_id)
        if tracked is None:
            tracked = await self._adopt(beat, function_id)
        if tracked is None or uuid.UUID(tracked.function_id) != function_id:
            return
        self.cluster.hear_replica(tracked, beat, now=self.clock.monotonic())

    async def _adopt(self, beat: ReplicaHeartbeat, function_id: uuid.UUID) -> TrackedReplica | None:
        """A live replica this scheduler did not start, tracked as its row describes it."""
        if beat.state in (ReplicaState.STOPPED, ReplicaState.FAILED):
            return None
        known = await self.records.live_replica(beat.replica_id)
        if known is None:
            return None  # no live row: not one of the platform's, or already written off
        if beat.replica_id in self.cluster.replicas:  # its own beat got here first
            return self.cluster.replicas[beat.replica_id]
        function, version_id, node_id = known
        if uuid.UUID(function) != function_id:
            return None
        tracked = TrackedReplica(
            beat.replica_id, function, version_id, node_id,
            launched_at=self.clock.monotonic(), startup_timeout_s=ADOPTED_STARTUP_TIMEOUT_S,
        )  # fmt: skip
        self.cluster.replicas[beat.replica_id] = tracked
        return tracked

    async def on_exit(self, msg: Msg) -> None:
        if not self.seals.platform_sent(msg, "a replica's exit"):
            return
        event = json.loads(msg.data)
        tracked = self.cluster.replicas.pop(event["replica_id"], None)
        failed = crashed(event)
        # The agent's word (its sandbox's memory cap stopped it) before the replica's own.
        error = event.get("error") or (tracked.beat.error if tracked and tracked.beat else None)
        if failed:
            self.crash_loops.failed(uuid.UUID(event["function_id"]), self.clock.monotonic())
        await self.records.set_state(
            event["replica_id"],
            ReplicaState.FAILED if failed else ReplicaState.STOPPED,
            error=error or (f"exited with status {event['exit_code']}" if failed else None),
            stopped=True,
        )
        self.wake.set()

    async def on_cold_start(self, msg: Msg) -> None:
        try:
            report = decode_own(ColdStartReport, msg.subject, msg.data)
            function_id = uuid.UUID(report.function_id)
            origin = Origin(report.origin)
            process = ProcessOrigin(report.process)
            phases = {str(k): float(v) for k, v in report.phases.items()}
        except (ValueError, TypeError, KeyError):
            _log.warning("ignoring an unreadable cold-start report")
            return
        if not self.seals.function_sent(msg, function_id, "a cold-start report"):
            return
        if "first_call" in phases:  # the follow-up after the first call: one phase only
            self.metrics.observe({"first_call": phases["first_call"]}, None)
            return
        tracked = self.cluster.replicas.get(report.replica_id)
        if tracked is not None and uuid.UUID(tracked.function_id) != function_id:
            return  # sealed by another function's replica
        if tracked is not None and tracked.schedule_s is not None:
            phases["schedule"] = tracked.schedule_s
            if tracked.requested_at:
                phases["total"] = max(0.0, self.clock.wall() - tracked.requested_at)
        self.metrics.observe(phases, origin.value, process.value)
        if origin is Origin.FALLBACK:
            _log.warning(
                "replica %s ran its setup hooks because its snapshot failed: %s",
                report.replica_id, report.fallback_reason,
            )  # fmt: skip
        if not await self.records.set_origin(report.replica_id, function_id, origin):
            self.cluster.remember_origin(report.replica_id, function_id, origin)

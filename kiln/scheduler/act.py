"""The scheduler's hands: orders to node agents (start a replica, drain it, stop it now) as
sealed NATS requests on `<ns>.node.<node>.cmd`, and the rows that record what came of them
(kiln.scheduler.records), so `kiln ps` and the control API show what the scheduler did.

A node that does not answer is an answer too (`{"ok": False}`): the pass goes on, and the next
one sees the node's silence. A start goes to the best node placement finds
(kiln.scheduler.placement); a node that refuses (its slots went since its last beat) is passed
over for the rest of the pass. A replica lost together with its node has the rest of its
billable time closed by `kiln.metering`, since its node agent can no longer do it.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import asdict, replace

from nats.aio.client import Client as NATS

from kiln._clock import Clock
from kiln.db.enums import NodeState, ReplicaState
from kiln.functions.gpu import gpu_request
from kiln.metering import close_lost_usage
from kiln.scheduler.cluster import ClusterView, TrackedReplica
from kiln.scheduler.placement import NodeView, place
from kiln.scheduler.pods import PodRow
from kiln.scheduler.reconcile import LostReplica
from kiln.scheduler.records import ClusterRecords, FunctionRow
from kiln.seal import Seals
from kiln.wire import StartReplica, Subjects, affinity_id

__all__ = ["COMMAND_TIMEOUT_S", "Orders", "pod_nodes"]

_log = logging.getLogger("kiln.scheduler")
COMMAND_TIMEOUT_S = 5.0
_STATES_SEEN = (ReplicaState.STARTING, ReplicaState.RESTORING, ReplicaState.DRAINING)


def pod_nodes(nodes: list[NodeView], pod: PodRow, gpu: str) -> list[NodeView]:
    """The nodes that may run the pod's replica: the one its volume lives on, if it does (it
    starts there, or waits for room there); for a container, one that runs them (with GPUs,
    when `gpu` asks for some)."""
    if pod.volume_node is not None:
        nodes = [node for node in nodes if node.node_id == pod.volume_node]
    if pod.image:
        gpus = gpu_request(gpu)[0] != "none"
        nodes = [n for n in nodes if n.containers and (n.gpu_containers or not gpus)]
    return nodes


class Orders:
    def __init__(
        self,
        nc: NATS,
        *,
        subjects: Subjects,
        cluster: ClusterView,
        records: ClusterRecords,
        seals: Seals,
        clock: Clock,
        signing_key: str | None,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.cluster = cluster
        self.records = records
        self.seals = seals
        self.clock = clock
        self.signing_key = signing_key  # the platform's, for the MAC of usage it closes

    async def command(
        self, node_id: str, command: dict[str, object], *, within_s: float = COMMAND_TIMEOUT_S
    ) -> dict[str, object]:
        subject, body = self.subjects.node_command(node_id), json.dumps(command).encode()
        try:
            reply = await self.nc.request(
                subject,
                body,
                timeout=within_s,
                headers=self.seals.platform(subject, body),
            )
        except Exception as exc:  # noqa: BLE001 - an unreachable node is an answer too
            return {"ok": False, "error": str(exc)}
        answer: dict[str, object] = json.loads(reply.data)
        return answer

    async def launch(
        self, function: FunctionRow, *, requested_at: float, pod: PodRow | None = None
    ) -> bool:
        """Start one replica of `function` on the best node that takes it; False when none
        does now (the demand waits in the queue). `requested_at`: when its demand was seen.
        `pod`: the replica is this pod's, with the id its row names."""
        candidates = self.cluster.placeable(self.clock.monotonic())
        if pod is not None:
            candidates = pod_nodes(candidates, pod, function.gpu)
        affinity = affinity_id(function.digest, f"{function.app}/{function.name}")
        kind, count = gpu_request(function.gpu)
        launch = StartReplica(
            replica_id=str(pod.replica_id if pod is not None else uuid.uuid4()),
            function_id=str(function.id),
            version_id=str(function.version_id),
            generation=function.generation,
            app=function.app,
            function=function.name,
            customer_id=str(function.customer_id),
            artifact_digest=function.digest,
            entrypoint=function.entrypoint,
            spec=function.spec,
            gpu_type=kind,
            gpu_count=count,
            requested_at=requested_at,
            pod_id=str(pod.id) if pod is not None else None,
            pod_kind=pod.kind.value if pod is not None else "",
            volume_gb=pod.volume_gb if pod is not None else 0,
            requirements=list(pod.requirements) if pod is not None else [],
            image=(pod.image or "") if pod is not None else "",
        )
        while (placement := place(function.gpu, candidates, affinity)) is not None:
            view = self.cluster.placement[placement.node_id]
            reply = await self.command(placement.node_id, {"op": "start", **asdict(launch)})
            if not reply.get("ok"):
                # Its slots went since its last beat: no more of that kind there, this pass.
                view.free[placement.kind] = 0
                continue
            view.take(placement.kind, placement.count, affinity)
            replica_id = launch.replica_id
            self.cluster.replicas[replica_id] = TrackedReplica(
                replica_id, str(function.id), str(function.version_id), placement.node_id,
                launched_at=self.clock.monotonic(), startup_timeout_s=function.startup_timeout_s,
                gpu=function.gpu, requested_at=requested_at,
                schedule_s=max(0.0, self.clock.wall() - requested_at),
                launch=replace(launch, received_at=_number(reply.get("billable_since"))),
            )  # fmt: skip
            _log.info("placed replica %s of %s/%s on %s (%s)", replica_id, function.app,
                      function.name, placement.node_id, placement.reason)  # fmt: skip
            await self.records.record_replica(launch, placement.node_id, reply)
            if pod is not None:
                await self.records.pod_launched(pod, placement.node_id)
            if (early := self.cluster.early_origins.pop(replica_id, None)) is not None:
                await self.records.set_origin(replica_id, *early)
            return True
        return False

    async def drain(self, tracked: TrackedReplica, *, grace_s: float) -> None:
        """It stops taking calls, finishes what it holds within `grace_s`, and exits."""
        tracked.draining = True
        await self.records.set_state(tracked.replica_id, ReplicaState.DRAINING)
        await self.command(tracked.node_id, {"op": "stop", "replica_id": tracked.replica_id,
                                             "grace_s": grace_s})  # fmt: skip

    async def stop_now(self, tracked: TrackedReplica) -> None:
        await self.command(
            tracked.node_id, {"op": "stop", "replica_id": tracked.replica_id, "grace_s": 0}
        )

    async def mark_ready(self, tracked: TrackedReplica) -> None:
        tracked.recorded_ready = True
        await self.records.set_state(tracked.replica_id, ReplicaState.READY, ready=True)

    async def node_lost(self, node_id: str) -> None:
        """Placement already passes it by; its replicas go lost on their own silence."""
        _log.warning("node %s is lost (no heartbeat)", node_id)
        self.cluster.lost_nodes.add(node_id)
        await self.records.set_node_state(node_id, NodeState.LOST)

    async def fail_unready(self, tracked: TrackedReplica) -> None:
        """Alive but not ready within its startup_timeout (a hung import or @enter): replace
        it."""
        if self.cluster.replicas.pop(tracked.replica_id, None) is None:
            return  # its exit came meanwhile
        await self.records.set_state(
            tracked.replica_id, ReplicaState.FAILED, stopped=True,
            error=f"not ready within startup_timeout ({tracked.startup_timeout_s:g} s)",
        )  # fmt: skip
        await self.stop_now(tracked)

    async def replica_lost(self, lost: LostReplica) -> None:
        tracked = lost.replica
        if self.cluster.replicas.pop(tracked.replica_id, None) is None:
            return  # its exit came meanwhile
        _log.warning("replica %s is lost (no heartbeat)", tracked.replica_id)
        seen = self.cluster.nodes.get(tracked.node_id)
        if lost.node_gone and seen is not None:
            # Its host is gone, and its node agent with it: billed up to the host's last beat.
            await close_lost_usage(
                self.nc, self.subjects, tracked.launch, ended=seen.wall,
                charged=self.records.usage_seqs, secret=self.signing_key,
            )  # fmt: skip
        await self.records.set_state(
            tracked.replica_id, ReplicaState.LOST, error="stopped heartbeating", stopped=True
        )
        await self.stop_now(tracked)

    async def record_beats(self) -> None:
        """What the replicas' heartbeats say that `kiln ps` shows: calls in flight, idle since
        when, and the states they move through on their own (restoring, draining)."""
        changed: dict[str, tuple[int, float | None, ReplicaState | None]] = {}
        for tracked in self.cluster.replicas.values():
            beat = tracked.beat
            if beat is None:
                continue
            state = ReplicaState(beat.state)
            seen = (beat.in_flight, beat.idle_since, state if state in _STATES_SEEN else None)
            if seen != tracked.recorded:
                tracked.recorded = seen
                changed[tracked.replica_id] = seen
        if changed:
            await self.records.record_beats(changed)


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0

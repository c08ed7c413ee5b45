"""What the scheduler knows of the cluster: the nodes and replicas it has heard from, when it
last heard each and what they said, the slots it has taken since, and the demand routers hinted.

Plain data with no I/O. `kiln.scheduler.observe` fills it from NATS, the pure decisions of
`kiln.scheduler.reconcile` read it, and `kiln.scheduler.act` adds what it ordered. Every time
in it comes from the scheduler's clock (kiln._clock): monotonic for ages, wall (epoch) only
where another process reads or wrote the time. Standby schedulers keep it current all along, so
a new leader starts from what is running, not from nothing.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field

from kiln.db.enums import ReplicaState
from kiln.scheduler.placement import NodeView
from kiln.wire import REPLICA_LOST_AFTER_S, NodeHeartbeat, Origin, ReplicaHeartbeat, StartReplica

__all__ = ["STARTING", "ClusterView", "SeenNode", "TrackedReplica"]

STARTING = (ReplicaState.STARTING, ReplicaState.RESTORING)
# Origins kept for replicas whose rows are not written yet (a bound, for ones never written).
_MAX_EARLY_ORIGINS = 1024


@dataclass
class TrackedReplica:
    replica_id: str
    function_id: str
    version_id: str
    node_id: str
    launched_at: float  # monotonic: when it was ordered, or adopted
    startup_timeout_s: float
    gpu: str = "none"
    last_seen: float | None = None  # monotonic: its last heartbeat
    beat: ReplicaHeartbeat | None = None
    draining: bool = False  # this scheduler told it to drain
    recorded_ready: bool = False
    # (in flight, idle since, a state it moved to itself) as last written to its row
    recorded: tuple[int, float | None, ReplicaState | None] | None = None
    requested_at: float = 0.0  # epoch seconds: when the demand it serves was seen
    schedule_s: float | None = None  # demand seen -> a node agent took the order
    launch: StartReplica | None = None  # as the node agent took it (its billable start)

    @property
    def pod_id(self) -> str | None:
        """The pod it serves (outside the autoscaler), as ordered or as it says itself."""
        if self.launch is not None:
            return self.launch.pod_id
        return self.beat.pod_id if self.beat is not None else None

    @property
    def state(self) -> ReplicaState:
        if self.draining:
            return ReplicaState.DRAINING
        return ReplicaState.STARTING if self.beat is None else ReplicaState(self.beat.state)

    @property
    def ready(self) -> bool:
        return self.beat is not None and self.beat.state == ReplicaState.READY

    @property
    def starting(self) -> bool:
        """It said it is starting (one never heard from is not judged by this)."""
        return self.beat is not None and self.beat.state in STARTING

    @property
    def serving(self) -> bool:
        """Starting or ready, and not on its way out (a replica may drain itself, e.g. after
        a sync call overran its timeout)."""
        if self.draining:
            return False
        return self.beat is None or self.beat.state in (*STARTING, ReplicaState.READY)


@dataclass
class SeenNode:
    beat: NodeHeartbeat
    at: float  # monotonic: when its last heartbeat came
    wall: float  # the same moment in epoch seconds (where a lost node's billed time ends)


@dataclass
class ClusterView:
    replicas: dict[str, TrackedReplica] = field(default_factory=dict)
    nodes: dict[str, SeenNode] = field(default_factory=dict)
    # For placement: each node's word from its last beat, less the slots taken since.
    placement: dict[str, NodeView] = field(default_factory=dict)
    lost_nodes: set[str] = field(default_factory=set)  # silent nodes, recorded as lost
    deaf_at: float = -math.inf  # monotonic: when the scheduler last found its NATS link down
    demand_at: dict[uuid.UUID, float] = field(default_factory=dict)  # first unmet, epoch s
    # Functions a router hinted demand for since the last pass: a pass starts with them.
    hinted: set[uuid.UUID] = field(default_factory=set)
    pending: dict[uuid.UUID, int] = field(default_factory=dict)  # queue depth, last asked
    # Origins reported before their replica's row was written (a standby restores a small
    # snapshot faster than the launch is recorded): applied once it is.
    early_origins: dict[str, tuple[uuid.UUID, Origin]] = field(default_factory=dict)

    def knows_node(self, node_id: str) -> bool:
        """Heard before and not declared lost since."""
        return node_id in self.nodes and node_id not in self.lost_nodes

    def hear_node(self, beat: NodeHeartbeat, *, now: float, wall: float) -> None:
        self.lost_nodes.discard(beat.node_id)
        self.nodes[beat.node_id] = SeenNode(beat, now, wall)
        # The agent's word replaces whatever this scheduler assumed since its last beat.
        self.placement[beat.node_id] = NodeView(
            beat.node_id,
            total=dict(beat.slots),
            free=dict(beat.free),
            standbys=dict(beat.standbys),
            snapshots=frozenset(beat.snapshots),
            ready_for=dict(beat.ready_for),
            containers=beat.containers,
            gpu_containers=beat.gpu_containers,
        )

    def hear_replica(self, tracked: TrackedReplica, beat: ReplicaHeartbeat, *, now: float) -> None:
        tracked.beat = beat
        tracked.last_seen = now

    def placeable(self, now: float) -> list[NodeView]:
        """The nodes heard from lately, as placement sees them."""
        return [
            self.placement[node_id]
            for node_id, seen in self.nodes.items()
            if now - seen.at < REPLICA_LOST_AFTER_S and node_id in self.placement
        ]

    def of_function(self, function_id: uuid.UUID) -> list[TrackedReplica]:
        return [r for r in self.replicas.values() if r.function_id == str(function_id)]

    def take_hints(self) -> set[uuid.UUID]:
        hinted, self.hinted = self.hinted, set()
        return hinted

    def remember_origin(self, replica_id: str, function_id: uuid.UUID, origin: Origin) -> None:
        self.early_origins[replica_id] = (function_id, origin)
        while len(self.early_origins) > _MAX_EARLY_ORIGINS:  # of replicas never recorded
            del self.early_origins[next(iter(self.early_origins))]

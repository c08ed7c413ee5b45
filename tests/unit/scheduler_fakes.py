"""Stand-ins for the scheduler's unit tests: its database rows in memory, NATS as the few calls
the scheduler makes (node commands, queue depth, usage publishes), and sealed messages as a
node agent, a replica or a router would send them. The scheduler itself (observe, reconcile,
act) is the real code, on a FakeClock (kiln._clock)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, NamedTuple, cast

from kiln._clock import FakeClock
from kiln.db.enums import NodeState, PodState, ReplicaState
from kiln.scheduler.pods import PodRow, broken_error, failed_error, idle_error
from kiln.scheduler.records import FunctionRow
from kiln.scheduler.scheduler import Scheduler
from kiln.seal import Seals
from kiln.wire import (
    NodeHeartbeat,
    ReplicaHeartbeat,
    StartReplica,
    Subjects,
    UsageReport,
    consumer_name,
    decode,
    encode,
)

NS = "t"
KEY = "k" * 40  # the platform's signing key: every message below is sealed with it
SUBJECTS = Subjects(NS)
SEALS = Seals(KEY)


def function_row(**changes: Any) -> FunctionRow:
    values: dict[str, Any] = dict(
        id=uuid.uuid4(), app="app", name="fn", customer_id=uuid.uuid4(),
        version_id=uuid.uuid4(), generation=1, digest="d" * 64, entrypoint="app.py",
        spec={"resources": {"gpu": "none"}}, gpu="none", min_replicas=0, max_replicas=4,
        buffer_replicas=0, idle_timeout_s=60, target_concurrency=1, startup_timeout_s=600,
        timeout_s=60,
    )  # fmt: skip
    values.update(changes)
    return FunctionRow(**values)


@dataclass
class Row:
    function_id: str
    version_id: str
    node_id: str
    state: ReplicaState = ReplicaState.STARTING
    error: str | None = None
    stopped: bool = False
    ready: bool = False  # it was recorded ready once


@dataclass
class Records:
    """The scheduler's rows (kiln.scheduler.records), in memory."""

    functions: dict[uuid.UUID, FunctionRow] = field(default_factory=dict)
    replicas: dict[str, Row] = field(default_factory=dict)
    nodes: dict[str, NodeState] = field(default_factory=dict)
    charged: dict[str, set[int]] = field(default_factory=dict)  # usage intervals in the ledger
    swept: list[list[str]] = field(default_factory=list)
    load_gate: asyncio.Event | None = None  # load_functions waits for it when set
    launched: asyncio.Event = field(default_factory=asyncio.Event)  # a replica was recorded
    # Active pods by id, as load_pods gives them; `pod_errors` what the scheduler wrote in
    # each pod's `error`, `pods_stopped` the pods it stopped.
    pods: dict[uuid.UUID, PodRow] = field(default_factory=dict)
    pod_errors: dict[uuid.UUID, str] = field(default_factory=dict)
    pods_stopped: set[uuid.UUID] = field(default_factory=set)

    async def load_functions(self) -> dict[uuid.UUID, FunctionRow]:
        if self.load_gate is not None:
            await self.load_gate.wait()
        return dict(self.functions)

    async def oldest_queued_job_s(self) -> float:
        return 0.0

    async def load_pods(self) -> list[PodRow]:
        """Each with its current replica's failed start, as the row of that replica says."""
        loaded = []
        for pod in self.pods.values():
            row = self.replicas.get(str(pod.replica_id))
            failed = row is not None and row.state == ReplicaState.FAILED and not row.ready
            failure = (row.error or "it exited before it was ready") if failed and row else None
            loaded.append(replace(pod, failure=failure))
        return loaded

    def _pod(self, pod: PodRow) -> PodRow | None:
        """The pod's row while it still names `pod`'s replica (kiln.scheduler.records)."""
        row = self.pods.get(pod.id)
        return row if row is not None and row.replica_id == pod.replica_id else None

    async def pod_launched(self, pod: PodRow, node_id: str) -> None:
        if (row := self._pod(pod)) is not None:
            self.pods[pod.id] = replace(row, launched=True)

    async def pod_ready(self, pod: PodRow) -> None:
        if (row := self._pod(pod)) is not None:
            self.pods[pod.id] = replace(row, state=PodState.RUNNING, failures=0)

    async def pod_active(self, pod: PodRow, at: float) -> None:
        if (row := self._pod(pod)) is not None:
            self.pods[pod.id] = replace(row, active_at=at)

    async def pod_failed(self, pod: PodRow) -> None:
        if (row := self._pod(pod)) is not None:
            self.pod_errors[pod.id] = failed_error(pod)
            self.pods[pod.id] = replace(
                row, state=PodState.STARTING, replica_id=uuid.uuid4(), launched=False,
                failures=pod.failures + 1,
            )  # fmt: skip

    async def pod_broken(self, pod: PodRow) -> None:
        await self._stopped(pod, broken_error(pod))

    async def pod_idle(self, pod: PodRow) -> None:
        await self._stopped(pod, idle_error(pod))

    async def _stopped(self, pod: PodRow, error: str) -> None:
        if self._pod(pod) is not None:
            del self.pods[pod.id]
            self.pod_errors[pod.id] = error
            self.pods_stopped.add(pod.id)

    async def minimums(self) -> dict[str, int]:
        return {str(f.id): f.min_replicas for f in self.functions.values()}

    async def record_node(self, beat: NodeHeartbeat) -> None:
        self.nodes[beat.node_id] = NodeState.READY

    async def set_node_state(self, node_id: str, state: NodeState) -> None:
        self.nodes[node_id] = state

    async def usage_seqs(self, replica_id: str) -> set[int]:
        return self.charged.get(replica_id, set())

    async def record_replica(
        self, launch: StartReplica, node_id: str, reply: dict[str, object]
    ) -> None:
        self.replicas[launch.replica_id] = Row(launch.function_id, launch.version_id, node_id)
        self.launched.set()

    async def live_replica(self, replica_id: str) -> tuple[str, str, str] | None:
        row = self.replicas.get(replica_id)
        if row is None or row.stopped:
            return None
        return row.function_id, row.version_id, row.node_id

    async def sweep_unadopted(self, known: list[str]) -> None:
        self.swept.append(sorted(known))
        for replica_id, row in self.replicas.items():
            if replica_id not in known and not row.stopped:
                row.state, row.stopped = ReplicaState.LOST, True

    async def record_beats(self, beats: dict[str, Any]) -> None: ...

    async def set_origin(self, replica_id: str, function_id: uuid.UUID, origin: Any) -> bool:
        return replica_id in self.replicas

    async def set_state(
        self,
        replica_id: str,
        state: ReplicaState,
        *,
        error: str | None = None,
        ready: bool = False,
        stopped: bool = False,
    ) -> None:
        row = self.replicas.setdefault(replica_id, Row("?", "?", "?"))
        row.state = state
        row.error = error or row.error
        row.stopped = row.stopped or stopped
        row.ready = row.ready or ready


Reply = Callable[[str, dict[str, Any]], dict[str, object]]


class Nats:
    """The NATS calls the scheduler makes: node commands (answered by `reply`), consumer info
    (`pending` by function) and usage publishes (kept in `usage`)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.is_connected = True
        self.commands: list[tuple[str, dict[str, Any]]] = []  # (node id, command)
        self.pending: dict[uuid.UUID, int] = {}
        self.asked: list[str] = []  # consumers whose info was asked, in order
        self.usage: list[UsageReport] = []
        self.reply: Reply = self.accept

    def accept(self, node_id: str, command: dict[str, Any]) -> dict[str, object]:
        return {"ok": True, "billable_since": self.clock.wall()}

    def jetstream(self) -> Any:
        return SimpleNamespace(consumer_info=self.consumer_info, publish=self.publish)

    async def request(self, subject: str, body: bytes, **options: Any) -> Any:
        assert SEALS.from_platform(subject, body, options["headers"]), "commands are sealed"
        node_id = subject.split(".")[-2]
        command = json.loads(body)
        self.commands.append((node_id, command))
        return SimpleNamespace(data=json.dumps(self.reply(node_id, command)).encode())

    async def consumer_info(self, stream: str, consumer: str, **options: Any) -> Any:
        self.asked.append(consumer)
        pending = next((n for f, n in self.pending.items() if consumer_name(f) == consumer), 0)
        return SimpleNamespace(num_pending=pending, num_ack_pending=0)

    async def publish(self, subject: str, body: bytes, **options: Any) -> None:
        self.usage.append(decode(UsageReport, body))

    def ops(self, op: str) -> list[dict[str, Any]]:
        return [c for _, c in self.commands if c["op"] == op]


def make_scheduler(
    clock: FakeClock, records: Records, *, lease_s: float | None = None
) -> tuple[Scheduler, Nats]:
    nc = Nats(clock)
    scheduler = Scheduler(
        cast(Any, nc), cast(Any, None), NS,
        lease_s=lease_s, signing_key=KEY, clock=clock, records=cast(Any, records),
        stream_replicas=1,
    )  # fmt: skip
    return scheduler, nc


class Ordered(NamedTuple):
    clock: FakeClock
    function: FunctionRow
    records: Records
    scheduler: Scheduler
    nc: Nats
    start: dict[str, Any]


async def one_replica_ordered() -> Ordered:
    """A scheduler on a fake clock with one node and one function (`min_replicas=1`), which
    has just ordered the function's first replica started (`start`: the order)."""
    clock = FakeClock()
    function = function_row(min_replicas=1)
    records = Records(functions={function.id: function})
    scheduler, nc = make_scheduler(clock, records)
    await scheduler.observer.on_node(node_beat("n1"))
    await scheduler.reconcile()
    [start] = nc.ops("start")
    return Ordered(clock, function, records, scheduler, nc, start)


def _sealed(subject: str, data: bytes, headers: dict[str, str] | None) -> Any:
    return SimpleNamespace(subject=subject, data=data, headers=headers)


def node_beat(node_id: str = "n1", *, slots: int = 4, free: int | None = None) -> Any:
    beat = NodeHeartbeat(
        node_id=node_id, hostname=node_id, slots={"none": slots},
        free={"none": slots if free is None else free}, standbys={"none": 1},
    )  # fmt: skip
    subject, body = SUBJECTS.node_heartbeat(node_id), encode(beat)
    return _sealed(subject, body, SEALS.platform(subject, body))


def replica_beat(
    replica_id: str,
    function: FunctionRow,
    *,
    node_id: str = "n1",
    state: ReplicaState = ReplicaState.READY,
    in_flight: int = 0,
    idle_since: float | None = None,
    pod_id: uuid.UUID | None = None,
    active_at: float | None = None,
) -> Any:
    beat = ReplicaHeartbeat(
        replica_id=replica_id, function_id=str(function.id), version_id=str(function.version_id),
        node_id=node_id, state=state.value, in_flight=in_flight, idle_since=idle_since,
        pod_id=str(pod_id) if pod_id is not None else None, active_at=active_at,
    )  # fmt: skip
    subject, body = SUBJECTS.replica_heartbeat(uuid.UUID(replica_id)), encode(beat)
    return _sealed(subject, body, SEALS.function(function.id, subject, body))


def exit_event(
    replica_id: str,
    function: FunctionRow,
    *,
    exit_code: int,
    requested: bool = False,
    error: str | None = None,
) -> Any:
    body = json.dumps({
        "replica_id": replica_id, "function_id": str(function.id),
        "exit_code": exit_code, "requested": requested, **({"error": error} if error else {}),
    }).encode()  # fmt: skip
    subject = SUBJECTS.replica_events
    return _sealed(subject, body, SEALS.platform(subject, body))


def demand_hint(function: FunctionRow) -> Any:
    subject, body = SUBJECTS.demand(function.id), b""
    return _sealed(subject, body, SEALS.platform(subject, body))

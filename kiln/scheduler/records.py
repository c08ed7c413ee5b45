"""What the scheduler reads from and writes to PostgreSQL: the deployed functions it reconciles,
and the `nodes` and `replicas` rows that the control API and `kiln ps` show. The reconcile loop
decides; this module only records. The times it writes come from the scheduler's clock
(kiln._clock), except where the database compares with its own."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kiln._clock import SYSTEM_CLOCK, Clock
from kiln.db.enums import ACTIVE_POD_STATES, AppState, CallStatus, NodeState, PodState, ReplicaState
from kiln.db.models import (
    App,
    AppVersion,
    Call,
    Customer,
    Function,
    Node,
    Pod,
    Replica,
    UsageEvent,
)
from kiln.db.session import transaction
from kiln.scheduler.pods import PodRow, broken_error, failed_error, idle_error
from kiln.scheduler.policy import Scaling
from kiln.wire import NodeHeartbeat, Origin, StartReplica

__all__ = ["ClusterRecords", "FunctionRow"]


@dataclass
class FunctionRow:
    """A deployed function as the scheduler sees it: its current version and live settings."""

    id: uuid.UUID
    app: str
    name: str
    customer_id: uuid.UUID
    version_id: uuid.UUID
    generation: int
    digest: str
    entrypoint: str
    spec: dict[str, object]
    gpu: str
    min_replicas: int
    max_replicas: int
    buffer_replicas: int
    idle_timeout_s: int
    target_concurrency: int
    startup_timeout_s: int
    timeout_s: int
    billing_block: str | None = None  # the owner may not start calls (kiln.billing.ledger)

    @property
    def scaling(self) -> Scaling:
        return Scaling(
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            buffer_replicas=self.buffer_replicas,
            target_concurrency=self.target_concurrency,
            idle_timeout_s=self.idle_timeout_s,
        )

    def with_gpu(self, gpu: str) -> FunctionRow:
        """The same function on other GPUs (a pod's own request)."""
        resources = {**dict(self.spec.get("resources", {})), "gpu": gpu}  # type: ignore[call-overload]
        return dataclasses.replace(self, gpu=gpu, spec={**self.spec, "resources": resources})

    def blocked_scaling(self, serving: int) -> Scaling:
        """While billing blocks the owner: no new replicas, and each one stops as soon as it
        has finished the calls it was given."""
        return Scaling(
            min_replicas=0,
            max_replicas=serving,
            buffer_replicas=0,
            target_concurrency=self.target_concurrency,
            idle_timeout_s=0,
        )


class ClusterRecords:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], *, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.sessions = sessions
        self.clock = clock

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.wall(), UTC)

    async def load_functions(self) -> dict[uuid.UUID, FunctionRow]:
        async with transaction(self.sessions) as session:
            rows = await session.execute(
                sa.select(App.name, App.customer_id, Customer.billing_block, Function, AppVersion)
                .join(App, Function.app_id == App.id)
                .join(Customer, Customer.id == App.customer_id)
                .join(AppVersion, Function.current_version_id == AppVersion.id)
                .where(App.state == AppState.ACTIVE)
            )
            result = {}
            for app, customer_id, block, function, version in rows:
                spec = next(
                    (f for f in version.spec.get("functions", []) if f["name"] == function.name),
                    None,
                )
                if spec is None:
                    continue
                result[function.id] = FunctionRow(
                    id=function.id, app=app, name=function.name, customer_id=customer_id,
                    version_id=version.id,
                    generation=function.generation,
                    digest=version.artifact_key, entrypoint=version.spec["entrypoint"],
                    spec=_with_live_settings(spec, function), gpu=function.gpu,
                    min_replicas=function.min_replicas, max_replicas=function.max_replicas,
                    buffer_replicas=function.buffer_replicas,
                    idle_timeout_s=function.idle_timeout_s,
                    target_concurrency=function.target_concurrency,
                    startup_timeout_s=function.startup_timeout_s, timeout_s=function.timeout_s,
                    billing_block=block,
                )  # fmt: skip
        return result

    async def load_pods(self) -> list[PodRow]:
        """The pods that want a replica, each with why its current replica failed to start
        if it did (its row: failed, never ready)."""
        failed = sa.and_(
            Replica.id == Pod.replica_id,
            Replica.state == ReplicaState.FAILED,
            Replica.ready_at.is_(None),
        )
        async with transaction(self.sessions) as session:
            rows = await session.execute(
                sa.select(Pod, Replica.id, Replica.error)
                .outerjoin(Replica, failed)
                .where(Pod.state.in_(ACTIVE_POD_STATES), Pod.function_id.is_not(None))
            )
            return [
                dataclasses.replace(
                    _pod_row(pod),
                    failure=None if replica is None else _reason(error),
                )
                for pod, replica, error in rows
            ]

    async def pod_volume_lost(self, pod: PodRow) -> None:
        """Its volume's node is lost: it starts elsewhere, from the copy parked at its last stop
        if there is one (kiln.scheduler.pod_volumes), else with an empty volume."""
        start = (
            "from the copy of its volume parked when it last stopped (what it wrote since is "
            "lost)" if pod.volume_key else "with an empty one"
        )  # fmt: skip
        await self._update_pod(
            pod, volume_node_id=None,
            error=f"its volume was on node {pod.volume_node}, which was lost: it starts {start}",
        )  # fmt: skip

    async def pod_launched(self, pod: PodRow, node_id: str) -> None:
        if pod.volume_gb:
            await self._update_pod(pod, node_id=node_id, volume_node_id=node_id)
        else:
            await self._update_pod(pod, node_id=node_id)

    async def pod_ready(self, pod: PodRow) -> None:
        await self._update_pod(pod, state=PodState.RUNNING, started_at=self._now(), failures=0)

    async def pod_failed(self, pod: PodRow) -> None:
        """Its replica failed to start: a shell ends; a pod tries again, one more failure."""
        error = failed_error(pod)
        if pod.shell:
            await self._update_pod(pod, state=PodState.ENDED, ended_at=self._now(), error=error)
        else:
            await self._update_pod(
                pod, state=PodState.STARTING, replica_id=uuid.uuid4(), node_id=None,
                failures=pod.failures + 1, error=error,
            )  # fmt: skip

    async def pod_broken(self, pod: PodRow) -> None:
        """Its replicas failed to start MAX_POD_FAILURES times in a row: it stops."""
        await self._update_pod(
            pod, state=PodState.STOPPED, stopped_at=self._now(), failures=pod.failures + 1,
            error=broken_error(pod),
        )  # fmt: skip

    async def pod_idle(self, pod: PodRow) -> None:
        """No traffic for its auto_stop_s: it stops, as POST /v1/pods/ID/stop stops it."""
        await self._update_pod(
            pod, state=PodState.STOPPED, stopped_at=self._now(), error=idle_error(pod)
        )

    async def pod_active(self, pod: PodRow, at: float) -> None:
        """Its last terminal or port traffic (epoch seconds), as its replica said."""
        await self._update_pod(pod, active_at=datetime.fromtimestamp(at, UTC))

    async def pod_gone(self, pod: PodRow, *, error: str | None = None) -> None:
        """Its replica ended: a shell ends with it; a pod starts again with a new replica."""
        if pod.shell:
            await self._update_pod(pod, state=PodState.ENDED, ended_at=self._now(), error=error)
        else:
            await self._update_pod(
                pod, state=PodState.STARTING, replica_id=uuid.uuid4(), node_id=None, error=error
            )

    async def pod_blocked(self, pod: PodRow, why: str) -> None:
        """Billing blocks its owner: a shell ends, a pod stops (it may be started again)."""
        now = self._now()
        if pod.shell:
            await self._update_pod(pod, state=PodState.ENDED, ended_at=now, error=why)
        else:
            await self._update_pod(pod, state=PodState.STOPPED, stopped_at=now, error=why)

    async def _update_pod(self, pod: PodRow, **values: object) -> None:
        await update_live_pod(self.sessions, pod, **values)

    async def oldest_queued_job_s(self) -> float:
        """Age in seconds of the oldest async job still queued, 0 when none. By the database's
        clock, which also wrote `created_at`; the (status, ...) index finds the queued rows."""
        async with transaction(self.sessions) as session:
            age = await session.scalar(
                sa.select(
                    sa.func.extract("epoch", sa.func.now() - sa.func.min(Call.created_at))
                ).where(Call.status == CallStatus.QUEUED)
            )
        return max(0.0, float(age)) if age is not None else 0.0

    async def minimums(self) -> dict[str, int]:
        """`min_replicas` by function id (as a string, like the replicas' heartbeats)."""
        async with transaction(self.sessions) as session:
            rows = await session.execute(sa.select(Function.id, Function.min_replicas))
            return {str(fid): minimum for fid, minimum in rows}

    async def record_node(self, beat: NodeHeartbeat) -> None:
        gpu_types = [k for k in beat.slots if k != "none"]
        values = {
            "hostname": beat.hostname,
            "gpu_type": gpu_types[0] if gpu_types else None,
            "gpu_count": sum(v for k, v in beat.slots.items() if k != "none"),
            "cpu_slots": beat.slots.get("none", 0),
            "last_heartbeat_at": self._now(),
            "labels": {"containers": beat.containers, "gpu_containers": beat.gpu_containers},
        }
        # An upsert: every scheduler, leading or standing by, records the nodes it hears (and a
        # node heard again is ready again).
        values["state"] = NodeState.READY
        insert = pg_insert(Node).values(id=beat.node_id, **values)
        async with transaction(self.sessions) as session:
            await session.execute(
                insert.on_conflict_do_update(index_elements=[Node.id], set_=values)
            )

    async def set_node_state(self, node_id: str, state: NodeState) -> None:
        async with transaction(self.sessions) as session:
            await session.execute(sa.update(Node).where(Node.id == node_id).values(state=state))

    async def usage_seqs(self, replica_id: str) -> set[int]:
        """The numbers of the replica's usage intervals the ledger has charged."""
        async with transaction(self.sessions) as session:
            ids = await session.scalars(
                sa.select(UsageEvent.id).where(UsageEvent.replica_id == uuid.UUID(replica_id))
            )
            return {int(seq) for _, _, seq in (i.rpartition(":") for i in ids) if seq.isdigit()}

    async def record_replica(
        self, launch: StartReplica, node_id: str, reply: dict[str, object]
    ) -> None:
        indices = reply.get("gpu_indices")
        async with transaction(self.sessions) as session:
            session.add(
                Replica(
                    id=uuid.UUID(launch.replica_id),
                    function_id=uuid.UUID(launch.function_id),
                    version_id=uuid.UUID(launch.version_id),
                    node_id=node_id,
                    state=ReplicaState.STARTING,
                    gpu_type=None if launch.gpu_type == "none" else str(reply.get("gpu_type")),
                    gpu_indices=list(indices) if isinstance(indices, list) else [],
                )
            )

    async def live_replica(self, replica_id: str) -> tuple[str, str, str] | None:
        """The function, version and node (ids as strings) of a replica whose row says it has
        not stopped, or None."""
        async with self.sessions() as session:
            row = (
                await session.execute(
                    sa.select(Replica.function_id, Replica.version_id, Replica.node_id).where(
                        Replica.id == uuid.UUID(replica_id), Replica.stopped_at.is_(None)
                    )
                )
            ).first()
        return None if row is None else (str(row[0]), str(row[1]), str(row[2]))

    async def sweep_unadopted(self, known: list[str]) -> None:
        """Mark lost the live rows of replicas not in `known` (they died with an earlier
        scheduler and never heartbeated to this one)."""
        live = (
            ReplicaState.STARTING, ReplicaState.RESTORING, ReplicaState.READY,
            ReplicaState.DRAINING,
        )  # fmt: skip
        async with transaction(self.sessions) as session:
            await session.execute(
                sa.update(Replica)
                .where(Replica.state.in_(live), Replica.id.not_in([uuid.UUID(k) for k in known]))
                .values(
                    state=ReplicaState.LOST,
                    stopped_at=self._now(),
                    error="not running when the scheduler started",
                )
            )

    async def record_beats(
        self, beats: dict[str, tuple[int, float | None, ReplicaState | None]]
    ) -> None:
        """Replica id -> (calls in flight, idle since (epoch seconds), a state it reported or
        None to leave the state alone), as their last heartbeats said."""
        now = self._now()
        async with transaction(self.sessions) as session:
            for replica_id, (in_flight, idle_since, state) in beats.items():
                values: dict[str, object] = {
                    "in_flight": in_flight,
                    "idle_since": (
                        None if idle_since is None else datetime.fromtimestamp(idle_since, UTC)
                    ),
                    "last_heartbeat_at": now,
                }
                if state is not None:
                    values["state"] = state
                await session.execute(
                    sa.update(Replica)
                    .where(Replica.id == uuid.UUID(replica_id), Replica.stopped_at.is_(None))
                    .values(**values)
                )

    async def set_origin(self, replica_id: str, function_id: uuid.UUID, origin: Origin) -> bool:
        """Whether the replica's row, a replica of `function_id`, was there to take it."""
        async with transaction(self.sessions) as session:
            result = await session.execute(
                sa.update(Replica)
                .where(Replica.id == uuid.UUID(replica_id), Replica.function_id == function_id)
                .values(origin=origin.value)
            )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def set_state(
        self,
        replica_id: str,
        state: ReplicaState,
        *,
        error: str | None = None,
        ready: bool = False,
        stopped: bool = False,
    ) -> None:
        values: dict[str, object] = {"state": state}
        now = self._now()
        if error is not None:
            values["error"] = error
        if ready:
            values["ready_at"] = now
        if stopped:
            values["stopped_at"] = now
        async with transaction(self.sessions) as session:
            await session.execute(
                sa.update(Replica).where(Replica.id == uuid.UUID(replica_id)).values(**values)
            )


def _with_live_settings(spec: dict[str, object], function: Function) -> dict[str, object]:
    """The spec a replica runs with: live changes (concurrency, timeout) override the code's."""
    resources = dict(spec["resources"])  # type: ignore[call-overload]
    resources.update(
        concurrency=function.concurrency,
        target_concurrency=function.target_concurrency,
        timeout_s=function.timeout_s,
    )
    return {**spec, "resources": resources}


async def update_live_pod(
    sessions: async_sessionmaker[AsyncSession], pod: PodRow, **values: object
) -> None:
    """Change the pod's row only while it still names the replica `pod` was loaded with and is
    active: a customer's stop or delete since the pass loaded it is not undone."""
    async with transaction(sessions) as session:
        await session.execute(
            sa.update(Pod)
            .where(
                Pod.id == pod.id,
                Pod.replica_id == pod.replica_id,
                Pod.state.in_(ACTIVE_POD_STATES),
            )
            .values(**values)
        )


def _function_of(pod: Pod) -> uuid.UUID:
    """An active pod's function: its app cannot be deleted under it (kiln.router.deploy)."""
    if pod.function_id is None:
        raise ValueError(f"pod {pod.id} is active without a function")
    return pod.function_id


def _pod_row(pod: Pod) -> PodRow:
    return PodRow(
        id=pod.id,
        kind=pod.kind,
        state=pod.state,
        function_id=_function_of(pod),
        replica_id=pod.replica_id,
        launched=pod.node_id is not None,
        name=pod.name,
        failures=pod.failures,
        auto_stop_s=pod.auto_stop_s,
        started_at=pod.started_at.timestamp() if pod.started_at is not None else None,
        active_at=pod.active_at.timestamp() if pod.active_at is not None else None,
        gpu=pod.gpu,
        volume_gb=pod.volume_gb,
        volume_node=pod.volume_node_id,
        requirements=tuple(pod.requirements),
        volume_key=pod.volume_key,
        image=pod.image,
    )


def _reason(error: str | None, limit: int = 500) -> str:
    """A failed replica's error as a pod's `error` quotes it: one line, at most `limit`."""
    text = " ".join((error or "it exited before it was ready").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"

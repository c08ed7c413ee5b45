"""Pods' volumes across nodes, for the scheduler.

A pod's volume lives on one node (`pods.volume_node_id`), where its replicas start. With a
store that parks volumes (`KILN_STORE_URL` file:// or s3://), a stopped pod's volume is parked
there (the node agent's `park_volume`: a sparse tar of its image, named `pods.volume_key`) and
the pod no longer belongs to that node: when it starts again, its volume is restored onto the
node that will run it (`restore_volume`; the parking node restores from its own cache), which
may be another. A parked copy also outlives its node: a pod whose node is lost starts elsewhere
from the copy of its last stop. An ended pod's volume is dropped from its node and its parked
copy, and cached images, from every node.

Parking, restoring and dropping take as long as the bytes take: each runs as a task of its
own, its result recorded when it ends, while the reconcile loop goes on without that pod.

`volume_node_id` set means the node's copy is the pod's volume (the parked one, if any, may be
older); unset with a `volume_key`, the parked copy is.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kiln._clock import Clock
from kiln.db.enums import PodState
from kiln.db.models import Pod
from kiln.db.session import transaction
from kiln.scheduler.act import pod_nodes
from kiln.scheduler.cluster import ClusterView
from kiln.scheduler.placement import place
from kiln.scheduler.pods import PodRow
from kiln.scheduler.records import update_live_pod

__all__ = ["MOVE_TIMEOUT_S", "PodVolumes", "VolumeRecords"]

_log = logging.getLogger("kiln.scheduler")
MOVE_TIMEOUT_S = 3600.0  # a parking or a restore of a large volume over a slow link
_RETRY_S = 30.0  # after a failed move, before the next try

# A node command and its answer: `Orders.command`.
Command = Callable[..., Awaitable[dict[str, object]]]


@dataclass(frozen=True)
class StoppedVolume:
    pod_id: uuid.UUID
    replica_id: uuid.UUID  # the pod's replica when it was loaded: a start since changes it
    node_id: str
    parked: str | None  # the copy it replaces


@dataclass(frozen=True)
class EndedVolume:
    pod_id: uuid.UUID
    node_id: str | None
    parked: str | None


class VolumeRecords:
    """The rows of volume moves (`pods.volume_node_id`, `pods.volume_key`)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    async def stopped(self) -> list[StoppedVolume]:
        """Stopped pods whose volume is on a node."""
        async with transaction(self.sessions) as session:
            rows = await session.execute(
                sa.select(Pod.id, Pod.replica_id, Pod.volume_node_id, Pod.volume_key).where(
                    Pod.state == PodState.STOPPED,
                    Pod.volume_gb > 0,
                    Pod.volume_node_id.is_not(None),
                )
            )
            return [StoppedVolume(p, r, str(n), k) for p, r, n, k in rows]

    async def ended(self) -> list[EndedVolume]:
        """Ended pods with a volume on a node or parked."""
        async with transaction(self.sessions) as session:
            rows = await session.execute(
                sa.select(Pod.id, Pod.volume_node_id, Pod.volume_key).where(
                    Pod.state == PodState.ENDED,
                    sa.or_(Pod.volume_node_id.is_not(None), Pod.volume_key.is_not(None)),
                )
            )
            return [EndedVolume(p, n, k) for p, n, k in rows]

    async def parked(self, volume: StoppedVolume, blob: str) -> None:
        """Its copy is in the store as `blob`; unless the pod was started meanwhile (its node's
        copy is then its volume again, the parked one a backup), it belongs to no node."""
        unchanged = sa.and_(Pod.state == PodState.STOPPED, Pod.replica_id == volume.replica_id)
        async with transaction(self.sessions) as session:
            await session.execute(
                sa.update(Pod)
                .where(Pod.id == volume.pod_id)
                .values(
                    volume_key=blob,
                    volume_node_id=sa.case((unchanged, None), else_=Pod.volume_node_id),
                )
            )

    async def restored(self, pod: PodRow, node_id: str) -> None:
        """Its parked volume is on `node_id` now: its replica starts there."""
        await update_live_pod(self.sessions, pod, volume_node_id=node_id, error=None)

    async def move_failed(self, pod_id: uuid.UUID, error: str) -> None:
        async with transaction(self.sessions) as session:
            await session.execute(sa.update(Pod).where(Pod.id == pod_id).values(error=error))

    async def dropped(self, pod_id: uuid.UUID) -> None:
        async with transaction(self.sessions) as session:
            await session.execute(
                sa.update(Pod).where(Pod.id == pod_id).values(volume_node_id=None, volume_key=None)
            )


class PodVolumes:
    def __init__(
        self,
        records: VolumeRecords | None,
        *,
        cluster: ClusterView,
        command: Command,
        clock: Clock,
        parks: bool,
    ) -> None:
        """`records`: None where there is no database (unit tests): no volume moves then.
        `command`: a node command and its answer. `parks`: the store takes parked volumes."""
        self.records = records
        self.cluster = cluster
        self.command = command
        self.clock = clock
        self.parks = parks
        self._moves: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._failed_at: dict[uuid.UUID, float] = {}

    def moving(self, pod_id: uuid.UUID) -> bool:
        return pod_id in self._moves

    async def sweep(self) -> None:
        """Drop ended pods' volumes; park stopped pods' (with a store that takes them)."""
        if self.records is None:
            return
        for ended in await self.records.ended():
            if ended.pod_id not in self._moves and self._may_try(ended.pod_id):
                self._start(ended.pod_id, self._drop(ended))
        if not self.parks:
            return
        held = {tracked.pod_id for tracked in self.cluster.replicas.values()}
        for stopped in await self.records.stopped():
            if stopped.pod_id in self._moves or str(stopped.pod_id) in held:
                continue  # moving already, or its replica is still on its way out
            if stopped.node_id in self.cluster.lost_nodes:
                continue  # the pod's start finds it lost and takes its parked copy, if any
            if self.cluster.knows_node(stopped.node_id) and self._may_try(stopped.pod_id):
                self._start(stopped.pod_id, self._park(stopped))

    async def restore(self, pod: PodRow, gpu: str) -> None:
        """A pod whose volume is parked, about to start: its volume onto the node that will run
        it (one with room for `gpu`), then the next pass launches it there."""
        if self.records is None or pod.id in self._moves or not self._may_try(pod.id):
            return
        nodes = pod_nodes(self.cluster.placeable(self.clock.monotonic()), pod, gpu)
        placement = place(gpu, nodes)
        if placement is None:
            return  # no room anywhere now: it waits, as a launch would
        self._start(pod.id, self._restore(pod, placement.node_id))

    async def close(self) -> None:
        for task in self._moves.values():
            task.cancel()
        await asyncio.gather(*self._moves.values(), return_exceptions=True)

    def _may_try(self, pod_id: uuid.UUID) -> bool:
        failed = self._failed_at.get(pod_id)
        return failed is None or self.clock.monotonic() - failed >= _RETRY_S

    def _start(self, pod_id: uuid.UUID, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception as exc:  # noqa: BLE001 - said on the pod; tried again later
                self._failed_at[pod_id] = self.clock.monotonic()
                _log.warning("moving the volume of pod %s failed: %s", pod_id, exc)
                assert self.records is not None
                await self.records.move_failed(pod_id, str(exc))
            else:
                self._failed_at.pop(pod_id, None)
            finally:
                self._moves.pop(pod_id, None)

        self._moves[pod_id] = asyncio.create_task(run(), name=f"kiln-volume-{pod_id}")

    async def _park(self, stopped: StoppedVolume) -> None:
        assert self.records is not None
        blob = f"{stopped.pod_id}/{uuid.uuid4().hex}.tar"
        reply = await self.command(
            stopped.node_id,
            {"op": "park_volume", "pod_id": str(stopped.pod_id), "blob": blob},
            within_s=MOVE_TIMEOUT_S,
        )
        if not reply.get("ok"):
            raise RuntimeError(f"its volume could not be parked: {reply.get('error')}")
        await self.records.parked(stopped, blob)
        _log.info("pod %s: volume parked from %s as %s", stopped.pod_id, stopped.node_id, blob)
        if stopped.parked:  # the copy it replaces (any node may delete it from the store)
            await self.command(stopped.node_id, {"op": "delete_parked", "blob": stopped.parked})

    async def _restore(self, pod: PodRow, node_id: str) -> None:
        assert self.records is not None
        assert pod.volume_key is not None
        reply = await self.command(
            node_id,
            {"op": "restore_volume", "pod_id": str(pod.id), "blob": pod.volume_key},
            within_s=MOVE_TIMEOUT_S,
        )
        if not reply.get("ok"):
            raise RuntimeError(
                f"its parked volume could not be restored on {node_id}: {reply.get('error')}"
            )
        await self.records.restored(pod, node_id)
        _log.info("pod %s: volume restored on %s", pod.id, node_id)

    async def _drop(self, ended: EndedVolume) -> None:
        """From its node, and with a parked copy from every node (any may cache it) and the
        store; a lost node took its copy with it."""
        assert self.records is not None
        nodes = {ended.node_id} if ended.node_id is not None else set()
        if ended.parked is not None:
            nodes |= set(self.cluster.placement)
        command = {"op": "drop_volume", "pod_id": str(ended.pod_id), "parked": ended.parked}
        done, confirmed = True, False
        for node_id in nodes - set(self.cluster.lost_nodes):
            if not self.cluster.knows_node(node_id):
                done = False  # not heard from yet (a scheduler that just started): later
                continue
            reply = await self.command(node_id, command, within_s=MOVE_TIMEOUT_S)
            confirmed = confirmed or bool(reply.get("ok"))
            done = done and bool(reply.get("ok"))
        # A parked copy is gone only once a node deleted it from the store.
        if done and (ended.parked is None or confirmed):
            await self.records.dropped(ended.pod_id)

"""The scheduler's reconcile loop: for every deployed function, compare the replicas it has
with the replicas its demand calls for, start or drain the difference, and keep the `replicas`
table true. A loop that never dies: a failed pass is logged once and the next one retries.

It is three seams put together once per pass:

- observe (`kiln.scheduler.observe`): heartbeats, exits, demand hints and cold-start reports
  become the `ClusterView` (`kiln.scheduler.cluster`), in NATS callbacks between passes;
- reconcile (`kiln.scheduler.reconcile`, `policy`, `backoff`): pure decisions from that view,
  the deployed functions and the clock: who is lost, what to start, drain or adopt;
- act (`kiln.scheduler.act`): orders to node agents and the rows that record them.

Routers' wake hints make scale-from-zero immediate rather than waiting for the next periodic
pass: a pass starts with the hinted functions, from the rows the last pass loaded. One
scheduler acts at a time (`kiln.scheduler.leader`); standbys observe all along. Time comes
from one injectable clock (kiln._clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import uuid

import nats.errors
from nats.aio.client import Client as NATS
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kiln._clock import SYSTEM_CLOCK, Clock
from kiln._trouble import Trouble
from kiln.observability.coldstart import ColdStartMetrics
from kiln.observability.scheduling import SchedulingMetrics
from kiln.scheduler.act import Orders
from kiln.scheduler.backoff import CrashLoops
from kiln.scheduler.cluster import ClusterView
from kiln.scheduler.leader import Leadership
from kiln.scheduler.observe import Observer
from kiln.scheduler.pod_volumes import PodVolumes, VolumeRecords
from kiln.scheduler.pods import plan_pods
from kiln.scheduler.reconcile import (
    ADOPTION_WINDOW_S,
    TAKEOVER_SETTLE_S,
    judge_silence,
    orphans,
    room_for,
    scale,
    turnover,
)
from kiln.scheduler.records import ClusterRecords, FunctionRow
from kiln.seal import Seals
from kiln.streams import queue_depth
from kiln.wire import Subjects

__all__ = ["Scheduler"]

_log = logging.getLogger("kiln.scheduler")
_PERIOD_S = 1.0
_DRAIN_S = 5.0
# How often the acting scheduler measures the job queue's age (one indexed query).
_JOB_AGE_EVERY_S = 5.0
# Grace for an idle replica drained to make room, or one whose function is gone.
_IDLE_GRACE_S = 30.0
# A stopped pod's terminals are hung up; its replica has this long to exit.
_POD_STOP_GRACE_S = 10.0


class Scheduler:
    def __init__(
        self,
        nc: NATS,
        sessions: async_sessionmaker[AsyncSession],
        namespace: str,
        metrics: ColdStartMetrics | None = None,
        *,
        lease_s: float | None = None,
        signing_key: str | None = None,
        stream_replicas: int,
        clock: Clock = SYSTEM_CLOCK,
        records: ClusterRecords | None = None,
        parks_volumes: bool = False,
    ) -> None:
        """`lease_s`: take part in leader election with a lease this long (several schedulers
        may then run; one acts). None: act alone, unconditionally. `signing_key`: the
        platform's, for the MAC of the usage it writes for lost nodes and the seals of what it
        sends and hears (kiln.seal). `stream_replicas`: copies of the lease bucket. `clock`:
        where every time it reads comes from. `records`: where it keeps its rows (by default
        in `sessions`' database). `parks_volumes`: stopped pods' volumes go to the store
        (kiln.scheduler.pod_volumes)."""
        self.nc = nc
        self.clock = clock
        self.seals = Seals(signing_key)
        self.metrics = metrics or ColdStartMetrics()
        self.scheduling = SchedulingMetrics(self.metrics.registry)
        self.js = nc.jetstream()
        self.records = records or ClusterRecords(sessions, clock=clock)
        self.subjects = Subjects(namespace)
        self.cluster = ClusterView()
        self.crash_loops = CrashLoops()
        self.wake = asyncio.Event()
        self.observer = Observer(
            self.cluster, self.records, seals=self.seals, clock=clock,
            crash_loops=self.crash_loops, metrics=self.metrics, wake=self.wake,
        )  # fmt: skip
        self.orders = Orders(
            nc, subjects=self.subjects, cluster=self.cluster, records=self.records,
            seals=self.seals, clock=clock, signing_key=signing_key,
        )  # fmt: skip
        self.volumes = PodVolumes(
            VolumeRecords(sessions) if records is None else None,
            cluster=self.cluster, command=self.orders.command, clock=clock, parks=parks_volumes,
        )  # fmt: skip
        # Every function as the last full pass loaded it: a hinted pass starts from these rows,
        # so a cold start waits for the node agent, not for the database.
        self.functions: dict[uuid.UUID, FunctionRow] = {}
        self.started_at = clock.monotonic()  # or took over: the adoption window runs from it
        self.swept = False  # the rows of replicas nobody adopted were written off
        self.settle_until = -math.inf  # monotonic; no launches before (after a takeover)
        self.job_age_at = -math.inf  # monotonic; when the job queue's age was last measured
        self.leadership = (
            Leadership(
                self.js,
                self.subjects.scheduler_lease,
                f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
                ttl_s=lease_s,
                on_change=self._on_leadership,
                seals=self.seals,
                replicas=stream_replicas,
                clock=clock,
            )
            if lease_s is not None
            else None
        )

    @property
    def acting(self) -> bool:
        return self.leadership is None or self.leadership.is_leader

    def _on_leadership(self) -> None:
        if self.acting:
            # What this process saw while standing by is current (it observed all along), but
            # a replica the old leader ordered just before it died may not have said hello
            # yet: no launches until it has had time to, so none is started twice.
            now = self.clock.monotonic()
            self.started_at = now
            self.swept = False
            if self.leadership is not None and self.leadership.contested:
                self.settle_until = now + TAKEOVER_SETTLE_S
        else:
            self.scheduling.standing_by()
        self.wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        subs = await self.observer.subscribe(self.nc, self.subjects)
        lease = (
            asyncio.create_task(self.leadership.run(stop), name="kiln-scheduler-lease")
            if self.leadership is not None
            else None
        )
        trouble = Trouble(_log, "a reconcile pass")
        try:
            while not stop.is_set():
                self.scheduling.leading.set(1 if self.acting else 0)
                # Cleared before the pass: a hint that comes while it runs wakes the next one.
                self.wake.clear()
                # While NATS is away there is nothing to learn or order: wait for it (and
                # judge no silence heard meanwhile, see _judge_silence).
                if not self.nc.is_connected:
                    self.cluster.deaf_at = self.clock.monotonic()
                elif self.acting:
                    try:
                        await self.reconcile()
                        trouble.ok()
                    except Exception as exc:  # noqa: BLE001 - the loop must outlive any pass
                        trouble.failed(exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake_or_stop(stop), _PERIOD_S)
        finally:
            await self.volumes.close()  # a move cut short is done again by the next leader
            if lease is not None:  # it gives the lease up on `stop`, or when cancelled
                if not stop.is_set():
                    lease.cancel()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(lease, 5)
            # Drained, not dropped: the exits a node agent sent on its way out (before this
            # stop, on this connection) are recorded first.
            for sub in subs:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(sub.drain(), _DRAIN_S)  # type: ignore[no-untyped-call]

    async def _wake_or_stop(self, stop: asyncio.Event) -> None:
        waiters = [asyncio.create_task(self.wake.wait()), asyncio.create_task(stop.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def reconcile(self) -> None:
        """One pass: hinted functions first, then silence, then every function."""
        for function_id in self.cluster.take_hints():
            # One deployed since the last pass is not known yet: the rest of this pass takes it.
            if (function := self.functions.get(function_id)) is not None:
                # A hint means a call waits: with no replica, that is enough to start the
                # first one without asking the queue; the rest of the pass counts the others.
                await self._guarded(function, waiting=1)
        now = self.clock.monotonic()
        await self._judge_silence(now)
        lost = len(self.cluster.lost_nodes)
        self.scheduling.node_states(ready=len(self.cluster.nodes) - lost, lost=lost)
        if not self.swept and now - self.started_at > ADOPTION_WINDOW_S:
            self.swept = True  # who was going to say hello has: the rest died meanwhile
            await self.records.sweep_unadopted(known=list(self.cluster.replicas))
        functions = self.functions = await self.records.load_functions()
        for function in functions.values():
            await self._guarded(function)
        self.scheduling.keep_only({(f.app, f.name) for f in functions.values()})
        await self.orders.record_beats()
        self.scheduling.replica_states(t.state for t in self.cluster.replicas.values())
        if now - self.job_age_at >= _JOB_AGE_EVERY_S:
            self.job_age_at = now
            self.scheduling.oldest_queued_job.set(await self.records.oldest_queued_job_s())
        for orphan in orphans(list(self.cluster.replicas.values()), functions):
            await self.orders.drain(orphan, grace_s=_IDLE_GRACE_S)
        await self._reconcile_pods(functions)

    async def _reconcile_pods(self, functions: dict[uuid.UUID, FunctionRow]) -> None:
        """Every active pod with its replica (kiln.scheduler.pods)."""
        blocked = frozenset(f.id for f in functions.values() if f.billing_block is not None)
        plan = plan_pods(
            await self.records.load_pods(), self.cluster.replicas, blocked=blocked,
            judged=self.swept, now=self.clock.wall(),
        )  # fmt: skip
        for pod in plan.blocked:
            await self.records.pod_blocked(pod, "billing blocks its owner (see GET "
                                           "/v1/billing/balance)")  # fmt: skip
        for pod in plan.gone:
            _log.info("pod %s: its replica %s ended (%s)", pod.id, pod.replica_id,
                      "the shell ends" if pod.shell else "it starts again")  # fmt: skip
            await self.records.pod_gone(pod)
        for pod in plan.failed:
            _log.warning("pod %s: its replica %s failed to start: %s", pod.id, pod.replica_id,
                         pod.failure)  # fmt: skip
            await self.records.pod_failed(pod)
        for pod in plan.broken:
            _log.warning("pod %s stops: its replicas failed to start %d times in a row", pod.id,
                         pod.failures + 1)  # fmt: skip
            await self.records.pod_broken(pod)
        for pod in plan.idle:
            _log.info("pod %s stops: no terminal or port traffic for %d s", pod.id,
                      pod.auto_stop_s)  # fmt: skip
            await self.records.pod_idle(pod)  # the next pass drains its replica
        for pod, at in plan.active:
            await self.records.pod_active(pod, at)
        for pod, tracked in plan.ready:
            await self.records.pod_ready(pod)
            if not tracked.recorded_ready:
                await self.orders.mark_ready(tracked)
        now = self.clock.monotonic()
        for pod in plan.start:
            function = functions.get(pod.function_id)
            if function is None or now < self.settle_until:
                continue
            if pod.volume_node is not None and pod.volume_node in self.cluster.lost_nodes:
                await self.records.pod_volume_lost(pod)  # the next pass starts it elsewhere
                continue
            if self.crash_loops.holds(function.id, now):
                continue  # its replicas keep failing: the backoff holds the pod's too
            if pod.gpu is not None:  # the pod's own GPUs, with its function's code
                function = function.with_gpu(pod.gpu)
            if pod.volume_gb and pod.volume_node is None and pod.volume_key is not None:
                await self.volumes.restore(pod, function.gpu)  # its volume first, then it
                continue
            if not await self.orders.launch(function, requested_at=self.clock.wall(), pod=pod):
                self.scheduling.placement_failures.labels(function.gpu).inc()
        for tracked in plan.stop:
            await self.orders.drain(tracked, grace_s=_POD_STOP_GRACE_S)
        await self.volumes.sweep()

    async def _judge_silence(self, now: float) -> None:
        # Heartbeats this scheduler missed while its own link to NATS was down say nothing
        # about the nodes and replicas: judge silence only once it has listened long enough.
        if not self.nc.is_connected:
            self.cluster.deaf_at = now
            return
        silence = judge_silence(self.cluster, now=now)
        for node_id in silence.nodes:
            self.scheduling.nodes_lost.inc()
            await self.orders.node_lost(node_id)
        for tracked in silence.unready:
            await self.orders.fail_unready(tracked)
        for lost in silence.replicas:
            await self.orders.replica_lost(lost)

    async def _guarded(self, function: FunctionRow, *, waiting: int = 0) -> None:
        """One function's part of a pass, which must not stall the others'."""
        try:
            await self._reconcile_function(function, waiting=waiting)
        except (nats.errors.Error, TimeoutError) as exc:  # NATS is away: the next pass retries
            _log.warning("reconciling %s/%s: NATS did not answer (%s)", function.app,
                         function.name, str(exc) or type(exc).__name__)  # fmt: skip
        except Exception:  # noqa: BLE001 - one bad function must not stall the others
            _log.exception("reconciling %s/%s failed", function.app, function.name)

    async def _reconcile_function(self, function: FunctionRow, *, waiting: int = 0) -> None:
        """`waiting`: calls known to wait for the function (a hint), used instead of asking
        its queue while it has no replica."""
        turn = turnover(function, self.cluster.replicas.values())
        for old in turn.retire:
            await self.orders.drain(old, grace_s=function.timeout_s + 10)
        for tracked in turn.became_ready:
            self.crash_loops.succeeded(function.id)
            await self.orders.mark_ready(tracked)
        if waiting and not turn.current:
            pending = waiting
        else:
            pending = await queue_depth(self.js, self.subjects.ns, function.id.hex)
            self.cluster.pending[function.id] = pending
        now = self.clock.monotonic()
        held = self.crash_loops.holds(function.id, now) or now < self.settle_until
        decision = scale(function, turn.current, pending=pending, now=self.clock.wall(), held=held)
        self.scheduling.function(
            function.app, function.name, desired=decision.plan.desired,
            actual=len(turn.current), pending=pending,
        )  # fmt: skip
        if decision.plan.desired <= len(turn.current):
            self.cluster.demand_at.pop(function.id, None)  # met: the next cold start times anew
        for _ in range(decision.start):
            requested_at = self.cluster.demand_at.get(function.id) or self.clock.wall()
            if not await self.orders.launch(function, requested_at=requested_at):
                self.scheduling.placement_failures.labels(function.gpu).inc()
                await self._make_room(function)
                break
            self.cluster.demand_at.pop(function.id, None)
            self.scheduling.decisions.labels("up").inc()
        for replica_id in decision.drain:
            if (idle := self.cluster.replicas.get(replica_id)) is not None:
                self.scheduling.decisions.labels("down").inc()
                await self.orders.drain(idle, grace_s=function.timeout_s + 10)

    async def _make_room(self, function: FunctionRow) -> None:
        victim = room_for(
            function,
            list(self.cluster.replicas.values()),
            pending=self.cluster.pending,
            minimums=await self.records.minimums(),
            now=self.clock.wall(),
        )
        if victim is not None:
            _log.info("draining idle replica %s to make room", victim.replica_id)
            await self.orders.drain(victim, grace_s=_IDLE_GRACE_S)

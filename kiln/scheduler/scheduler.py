"""The scheduler's reconcile loop: for every deployed function, compare the replicas it has
with the replicas its demand calls for, start or drain the difference, and keep the `replicas`
table true.

Inputs: work-queue pending counts (JetStream consumer info), replica and node heartbeats, the
node agents' exit events, and the router's wake hints (which make scale-from-zero immediate
rather than waiting for the next periodic pass). Replicas' cold-start reports become the
cold-start metrics and each replica's `origin` (restored from a snapshot or not). The decisions
themselves are the pure functions of `kiln.scheduler.policy`.

Placement is `kiln.scheduler.placement` (GPU type and count, then a node that caches the
function's snapshot, then one with a ready standby, then the least loaded). Issue 5 goes on to
leader election and crash-loop handling around the same seams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, replace

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kiln._trouble import Trouble
from kiln.db.enums import NodeState, ReplicaState
from kiln.functions.gpu import gpu_request
from kiln.metering import missing_reports, publish_usage
from kiln.observability.coldstart import ColdStartMetrics
from kiln.observability.scheduling import SchedulingMetrics
from kiln.scheduler.leader import Leadership
from kiln.scheduler.placement import NodeView, place
from kiln.scheduler.policy import ReplicaView, plan
from kiln.scheduler.records import ClusterRecords, FunctionRow
from kiln.seal import Seals
from kiln.wire import (
    HEARTBEAT_INTERVAL_S,
    REPLICA_LOST_AFTER_S,
    ColdStartReport,
    NodeHeartbeat,
    Origin,
    ProcessOrigin,
    ReplicaHeartbeat,
    StartReplica,
    Subjects,
    affinity_id,
    consumer_name,
    decode,
    decode_own,
)

__all__ = ["Scheduler"]

_log = logging.getLogger("kiln.scheduler")
_PERIOD_S = 1.0
_COMMAND_TIMEOUT_S = 5.0
_DRAIN_S = 5.0
# Room is made only from replicas idle at least this long, so busy functions do not thrash.
_MIN_IDLE_TO_PREEMPT_S = 10.0
# After a restart, replicas that have not heartbeated within this time are gone.
_ADOPTION_WINDOW_S = 2 * REPLICA_LOST_AFTER_S
# A new leader waits this long before starting replicas: two heartbeats of every live one.
_TAKEOVER_SETTLE_S = 2 * HEARTBEAT_INTERVAL_S
_STARTING = (ReplicaState.STARTING, ReplicaState.RESTORING)
# States a replica reports on its own; the scheduler records READY (with its time) itself.
_SELF_MOVED = (*_STARTING, ReplicaState.DRAINING)
# How often the acting scheduler measures the job queue's age (one indexed query).
_JOB_AGE_EVERY_S = 5.0
# Origins kept for replicas whose rows are not written yet (a bound, for ones never written).
_MAX_EARLY_ORIGINS = 1024


@dataclass
class _Tracked:
    replica_id: str
    function_id: str
    version_id: str
    node_id: str
    launched_at: float
    startup_timeout_s: float
    gpu: str = "none"
    last_seen: float | None = None
    beat: ReplicaHeartbeat | None = None
    draining: bool = False
    recorded_ready: bool = False
    # (in flight, idle since, a state it moved to itself) as last written to its row
    recorded: tuple[int, float | None, ReplicaState | None] | None = None
    requested_at: float = 0.0  # when the demand it serves was seen (epoch seconds)
    schedule_s: float | None = None  # demand seen -> a node agent took the order
    launch: StartReplica | None = None  # as the node agent took it (its billable start)


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
        stream_replicas: int = 1,
    ) -> None:
        """`lease_s`: take part in leader election with a lease this long (several schedulers
        may then run; one acts). None: act alone, unconditionally. `signing_key`: the
        platform's, for the MAC of the usage it writes for lost nodes and the seals of what it
        sends and hears (kiln.seal). `stream_replicas`: copies of the lease bucket."""
        self.nc = nc
        self.signing_key = signing_key
        self.seals = Seals(signing_key)
        self.metrics = metrics or ColdStartMetrics()
        self.scheduling = SchedulingMetrics(self.metrics.registry)
        self.js = nc.jetstream()
        self.records = ClusterRecords(sessions)
        self.subjects = Subjects(namespace)
        self.replicas: dict[str, _Tracked] = {}
        self.nodes: dict[str, tuple[NodeHeartbeat, float]] = {}
        self.views: dict[str, NodeView] = {}  # for placement; slots taken since the last beat
        self.lost_nodes: set[str] = set()  # silent nodes, recorded as lost
        self.deaf_at = -math.inf  # when this scheduler last found its NATS link down
        self.wake = asyncio.Event()
        self.backoff_until: dict[uuid.UUID, float] = {}
        self.failures: dict[uuid.UUID, int] = {}
        self.pending: dict[uuid.UUID, int] = {}
        self.demand_at: dict[uuid.UUID, float] = {}  # first unmet demand, for the schedule phase
        # Functions a router hinted demand for since the last pass, and every function as the
        # last full pass loaded it: a pass starts with the hinted ones, from those rows, so a
        # cold start waits for the node agent, not for the database and every other function.
        self.hinted: set[uuid.UUID] = set()
        self.functions: dict[uuid.UUID, FunctionRow] = {}
        # Origins reported before their replica's row was written (a standby restores a small
        # snapshot faster than the launch is recorded): applied once it is.
        self.early_origins: dict[str, tuple[uuid.UUID, Origin]] = {}  # by replica id
        self.started_at = time.monotonic()
        self.swept = False
        self.settle_until = 0.0  # monotonic; no launches before (after a takeover)
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
            self.started_at = time.monotonic()
            self.swept = False
            if self.leadership is not None and self.leadership.contested:
                self.settle_until = time.monotonic() + _TAKEOVER_SETTLE_S
        else:
            self.scheduling.standing_by()
        self.wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        subs = [
            await self.nc.subscribe(self.subjects.all_demand, cb=self._on_demand),
            await self.nc.subscribe(self.subjects.all_replica_heartbeats, cb=self._on_replica),
            await self.nc.subscribe(self.subjects.all_node_heartbeats, cb=self._on_node),
            await self.nc.subscribe(self.subjects.replica_events, cb=self._on_exit),
            await self.nc.subscribe(self.subjects.all_cold_starts, cb=self._on_cold_start),
        ]
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
                # judge no silence heard meanwhile, see _mark_lost).
                if not self.nc.is_connected:
                    self.deaf_at = time.monotonic()
                elif self.acting:
                    try:
                        await self.reconcile()
                        trouble.ok()
                    except Exception as exc:  # noqa: BLE001 - the loop must outlive any pass
                        trouble.failed(exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake_or_stop(stop), _PERIOD_S)
        finally:
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

    # Observations ------------------------------------------------------------------------------

    async def _on_demand(self, msg: Msg) -> None:
        if not self.seals.platform_sent(msg, "a demand hint"):
            return
        with contextlib.suppress(ValueError):
            function_id = uuid.UUID(hex=msg.subject.rsplit(".", 1)[-1])
            self.demand_at.setdefault(function_id, time.time())
            self.hinted.add(function_id)
        self.wake.set()

    async def _on_cold_start(self, msg: Msg) -> None:
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
        tracked = self.replicas.get(report.replica_id)
        if tracked is not None and uuid.UUID(tracked.function_id) != function_id:
            return  # sealed by another function's replica
        if tracked is not None and tracked.schedule_s is not None:
            phases["schedule"] = tracked.schedule_s
            if tracked.requested_at:
                phases["total"] = max(0.0, time.time() - tracked.requested_at)
        self.metrics.observe(phases, origin.value, process.value)
        if origin is Origin.FALLBACK:
            _log.warning(
                "replica %s ran its setup hooks because its snapshot failed: %s",
                report.replica_id, report.fallback_reason,
            )  # fmt: skip
        if not await self.records.set_origin(report.replica_id, function_id, origin):
            self.early_origins[report.replica_id] = (function_id, origin)
            while len(self.early_origins) > _MAX_EARLY_ORIGINS:  # of replicas never recorded
                del self.early_origins[next(iter(self.early_origins))]

    async def _on_replica(self, msg: Msg) -> None:
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
        tracked = self.replicas.get(beat.replica_id)
        if tracked is not None and uuid.UUID(tracked.function_id) != function_id:
            return
        if tracked is None:
            if beat.state in (ReplicaState.STOPPED, ReplicaState.FAILED):
                return
            # A replica we did not start (this scheduler restarted): adopt it, as its row
            # describes it (the beat is the replica's word, and it runs customers' code).
            known = await self.records.live_replica(beat.replica_id)
            if known is None or beat.replica_id in self.replicas:
                return
            function, version_id, node_id = known
            if uuid.UUID(function) != function_id:
                return
            tracked = _Tracked(
                beat.replica_id, function, version_id, node_id,
                launched_at=time.time(), startup_timeout_s=600,
            )  # fmt: skip
            self.replicas[beat.replica_id] = tracked
        tracked.beat = beat
        tracked.last_seen = time.monotonic()

    async def _on_node(self, msg: Msg) -> None:
        if not self.seals.platform_sent(msg, "a node heartbeat"):
            return
        beat = decode(NodeHeartbeat, msg.data)
        if beat.node_id not in self.nodes or beat.node_id in self.lost_nodes:
            self.lost_nodes.discard(beat.node_id)
            # Recorded before it can be chosen: replica rows refer to their node.
            await self.records.record_node(beat)
            self.wake.set()
        self.nodes[beat.node_id] = (beat, time.monotonic())
        # The agent's word replaces whatever this scheduler assumed since its last beat.
        self.views[beat.node_id] = NodeView(
            beat.node_id,
            total=dict(beat.slots),
            free=dict(beat.free),
            standbys=dict(beat.standbys),
            snapshots=frozenset(beat.snapshots),
            ready_for=dict(beat.ready_for),
        )

    async def _on_exit(self, msg: Msg) -> None:
        if not self.seals.platform_sent(msg, "a replica's exit"):
            return
        event = json.loads(msg.data)
        tracked = self.replicas.pop(event["replica_id"], None)
        failed = event["exit_code"] != 0 and not event.get("requested")
        # The agent's word (its sandbox's memory cap stopped it) before the replica's own.
        error = event.get("error") or (tracked.beat.error if tracked and tracked.beat else None)
        if failed:
            function_id = uuid.UUID(event["function_id"])
            count = self.failures.get(function_id, 0) + 1
            self.failures[function_id] = count
            self.backoff_until[function_id] = time.monotonic() + min(60.0, 2.0**count)
        await self.records.set_state(
            event["replica_id"],
            ReplicaState.FAILED if failed else ReplicaState.STOPPED,
            error=error or (f"exited with status {event['exit_code']}" if failed else None),
            stopped=True,
        )
        self.wake.set()

    # Reconcile ---------------------------------------------------------------------------------

    async def reconcile(self) -> None:
        now_mono = time.monotonic()
        await self._reconcile_hinted(now_mono)
        await self._mark_lost(now_mono)
        lost = len(self.lost_nodes)
        self.scheduling.node_states(ready=len(self.nodes) - lost, lost=lost)
        if not self.swept and now_mono - self.started_at > _ADOPTION_WINDOW_S:
            self.swept = True
            await self.records.sweep_unadopted(known=list(self.replicas))
        functions = self.functions = await self.records.load_functions()
        for function in functions.values():
            try:
                await self._reconcile_function(function, now_mono)
            except (nats.errors.Error, TimeoutError) as exc:  # NATS is away: the next pass retries
                _log.warning("reconciling %s/%s: NATS did not answer (%s)", function.app,
                             function.name, str(exc) or type(exc).__name__)  # fmt: skip
            except Exception:  # noqa: BLE001 - one bad function must not stall the others
                _log.exception("reconciling %s/%s failed", function.app, function.name)
        self.scheduling.keep_only({(f.app, f.name) for f in functions.values()})
        await self._record_beats()
        self.scheduling.replica_states(_state_of(t) for t in self.replicas.values())
        if now_mono - self.job_age_at >= _JOB_AGE_EVERY_S:
            self.job_age_at = now_mono
            self.scheduling.oldest_queued_job.set(await self.records.oldest_queued_job_s())
        # Replicas of functions that no longer exist (app deleted, function removed): drain.
        for tracked in list(self.replicas.values()):
            if uuid.UUID(tracked.function_id) not in functions and not tracked.draining:
                await self._drain(tracked, grace_s=30)

    async def _reconcile_hinted(self, now_mono: float) -> None:
        """The functions routers hinted demand for, first (one deployed since the last pass is
        not known yet: the rest of this pass takes it)."""
        hinted, self.hinted = self.hinted, set()
        for function_id in hinted:
            function = self.functions.get(function_id)
            if function is None:
                continue
            try:
                # A hint means a call waits: with no replica, that is enough to start the
                # first one without asking the queue; the rest of the pass counts the others.
                await self._reconcile_function(function, now_mono, waiting=1)
            except (nats.errors.Error, TimeoutError) as exc:  # NATS is away: the next pass retries
                _log.warning("reconciling %s/%s: NATS did not answer (%s)", function.app,
                             function.name, str(exc) or type(exc).__name__)  # fmt: skip
            except Exception:  # noqa: BLE001 - the rest of the pass tries it again
                _log.exception("reconciling %s/%s failed", function.app, function.name)

    async def _record_beats(self) -> None:
        """What the replicas' heartbeats say that `kiln ps` shows: calls in flight, idle since
        when, and the states they move through on their own (restoring, draining)."""
        changed: dict[str, tuple[int, float | None, ReplicaState | None]] = {}
        for tracked in self.replicas.values():
            beat = tracked.beat
            if beat is None:
                continue
            state = ReplicaState(beat.state)
            seen = (beat.in_flight, beat.idle_since, state if state in _SELF_MOVED else None)
            if seen != tracked.recorded:
                tracked.recorded = seen
                changed[tracked.replica_id] = seen
        if changed:
            await self.records.record_beats(changed)

    async def _reconcile_function(
        self, function: FunctionRow, now_mono: float, *, waiting: int = 0
    ) -> None:
        """`waiting`: calls known to wait for the function (a hint), used instead of asking
        its queue while it has no replica."""
        mine = [r for r in self.replicas.values() if r.function_id == str(function.id)]
        current = [r for r in mine if r.version_id == str(function.version_id) and _serving(r)]
        # Old versions drain once idle or once a replica of the current version is ready (a
        # drain finishes what it holds); new replicas take the demand.
        current_ready = any(
            r.beat is not None and r.beat.state == ReplicaState.READY for r in current
        )
        for old in mine:
            outdated = old.version_id != str(function.version_id) and not old.draining
            if outdated and (current_ready or old.beat is None or old.beat.in_flight == 0):
                await self._drain(old, grace_s=function.timeout_s + 10)
        for tracked in current:
            ready = tracked.beat is not None and tracked.beat.state == ReplicaState.READY
            if ready and not tracked.recorded_ready:
                tracked.recorded_ready = True
                self.failures.pop(function.id, None)
                await self.records.set_state(tracked.replica_id, ReplicaState.READY, ready=True)
        if waiting and not current:
            pending = waiting
        else:
            pending = self.pending[function.id] = await self._pending(function.id)
        views = [
            ReplicaView(
                r.replica_id,
                r.beat.in_flight if r.beat else 0,
                r.beat.idle_since if r.beat else None,
                ready=r.beat is not None and r.beat.state == ReplicaState.READY,
            )
            for r in current
        ]
        scaling = (
            function.scaling
            if function.billing_block is None
            else function.blocked_scaling(len(current))
        )
        decision = plan(scaling, views, pending=pending, now=time.time())
        self.scheduling.function(
            function.app, function.name, desired=decision.desired, actual=len(current),
            pending=pending,
        )  # fmt: skip
        if decision.desired <= len(current):
            self.demand_at.pop(function.id, None)  # met: the next cold start times anew
        if decision.start:
            if self.backoff_until.get(function.id, 0) > now_mono or now_mono < self.settle_until:
                return
            for _ in range(decision.start):
                if not await self._launch(function):
                    self.scheduling.placement_failures.labels(function.gpu).inc()
                    await self._free_slot_for(function)
                    break
                self.scheduling.decisions.labels("up").inc()
        for replica_id in decision.drain:
            idle = self.replicas.get(replica_id)
            if idle is not None:
                self.scheduling.decisions.labels("down").inc()
                await self._drain(idle, grace_s=function.timeout_s + 10)

    async def _pending(self, function_id: uuid.UUID) -> int:
        try:
            info = await self.js.consumer_info(
                self.subjects.calls_stream, consumer_name(function_id), timeout=2
            )
        except NotFoundError:
            return 0
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def _mark_lost(self, now_mono: float) -> None:
        # Heartbeats this scheduler missed while its own link to NATS was down say nothing
        # about the nodes and replicas: judge silence only once it has listened long enough.
        if not self.nc.is_connected:
            self.deaf_at = now_mono
            return
        if now_mono - self.deaf_at < REPLICA_LOST_AFTER_S:
            return
        for node_id, (_, seen) in self.nodes.items():
            if now_mono - seen > REPLICA_LOST_AFTER_S and node_id not in self.lost_nodes:
                # Placement already passes it by; its replicas go lost on their own silence.
                _log.warning("node %s is lost (no heartbeat)", node_id)
                self.lost_nodes.add(node_id)
                self.scheduling.nodes_lost.inc()
                await self.records.set_node_state(node_id, NodeState.LOST)
        for tracked in list(self.replicas.values()):
            starting = tracked.beat is not None and tracked.beat.state in _STARTING
            if starting and time.time() - tracked.launched_at > tracked.startup_timeout_s:
                # Alive but never ready (a hung import or @enter): replace it.
                del self.replicas[tracked.replica_id]
                await self.records.set_state(
                    tracked.replica_id, ReplicaState.FAILED, stopped=True,
                    error=f"not ready within startup_timeout ({tracked.startup_timeout_s:g} s)",
                )  # fmt: skip
                await self._stop_now(tracked)
                continue
            silent_since = tracked.last_seen
            if silent_since is None:
                # Never heard from: allowed its startup time before it counts as lost.
                if time.time() - tracked.launched_at < tracked.startup_timeout_s:
                    continue
            elif now_mono - silent_since < REPLICA_LOST_AFTER_S:
                continue
            del self.replicas[tracked.replica_id]
            _log.warning("replica %s is lost (no heartbeat)", tracked.replica_id)
            if tracked.node_id in self.lost_nodes:
                await self._close_usage(tracked, now_mono)
            await self.records.set_state(
                tracked.replica_id, ReplicaState.LOST, error="stopped heartbeating", stopped=True
            )
            await self._stop_now(tracked)

    async def _close_usage(self, tracked: _Tracked, now_mono: float) -> None:
        """Its host is gone, and its node agent with it: write the replica's usage intervals
        the ledger lacks, up to the host's last heartbeat (the copies of intervals the replica
        did report collide with them and count once)."""
        launch = tracked.launch
        if launch is None or not launch.received_at:
            return  # adopted from an earlier scheduler: where its time began is unknown
        _, seen_mono = self.nodes[tracked.node_id]
        ended = time.time() - (now_mono - seen_mono)
        try:
            reports = missing_reports(
                launch, ended, await self.records.usage_seqs(launch.replica_id)
            )
            for report in reports:
                await publish_usage(self.nc, self.subjects, report, secret=self.signing_key)
        except Exception as exc:  # noqa: BLE001 - at most the intervals since its last report
            _log.error("could not close the usage of lost replica %s: %s", launch.replica_id, exc)

    # Actions -----------------------------------------------------------------------------------

    async def _launch(self, function: FunctionRow) -> bool:
        now = time.monotonic()
        candidates = [
            self.views[node_id]
            for node_id, (_, seen) in self.nodes.items()
            if now - seen < REPLICA_LOST_AFTER_S and node_id in self.views
        ]
        affinity = affinity_id(function.digest, f"{function.app}/{function.name}")
        replica_id = str(uuid.uuid4())
        requested_at = self.demand_at.get(function.id) or time.time()
        kind, count = gpu_request(function.gpu)
        launch = StartReplica(
            replica_id=replica_id,
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
        )
        while (placement := place(function.gpu, candidates, affinity)) is not None:
            view = self.views[placement.node_id]
            reply = await self._command(placement.node_id, {"op": "start", **asdict(launch)})
            if not reply.get("ok"):
                # Its slots went since its last beat: no more of that kind there, this pass.
                view.free[placement.kind] = 0
                continue
            view.take(placement.kind, placement.count, affinity)
            self.demand_at.pop(function.id, None)
            self.replicas[replica_id] = _Tracked(
                replica_id, str(function.id), str(function.version_id), placement.node_id,
                launched_at=time.time(), startup_timeout_s=function.startup_timeout_s,
                gpu=function.gpu, requested_at=requested_at,
                schedule_s=max(0.0, time.time() - requested_at),
                launch=replace(launch, received_at=_number(reply.get("billable_since"))),
            )  # fmt: skip
            _log.info("placed replica %s of %s/%s on %s (%s)", replica_id, function.app,
                      function.name, placement.node_id, placement.reason)  # fmt: skip
            await self.records.record_replica(launch, placement.node_id, reply)
            if (early := self.early_origins.pop(replica_id, None)) is not None:
                await self.records.set_origin(replica_id, *early)
            return True
        return False  # nothing fits now; the demand waits in the queue

    async def _free_slot_for(self, function: FunctionRow) -> None:
        """Nothing fits: drain the replica of another function that has been idle longest, if
        it needs the same kind of slot and its function keeps its minimum, so waiting demand
        does not starve behind replicas that only wait for their idle timeout."""
        minimums = await self.records.minimums()
        live: dict[str, int] = {}
        for tracked in self.replicas.values():
            if _serving(tracked):
                live[tracked.function_id] = live.get(tracked.function_id, 0) + 1
        now = time.time()
        candidates = [
            t for t in self.replicas.values()
            if _serving(t) and t.function_id != str(function.id) and t.gpu == function.gpu
            and t.beat is not None and t.beat.state == ReplicaState.READY
            and t.beat.in_flight == 0 and t.beat.idle_since is not None
            and now - t.beat.idle_since >= _MIN_IDLE_TO_PREEMPT_S
            and not self.pending.get(uuid.UUID(t.function_id))
            and live[t.function_id] > minimums.get(t.function_id, 0)
        ]  # fmt: skip
        if candidates:
            victim = min(candidates, key=lambda t: (t.beat.idle_since or 0.0) if t.beat else 0.0)
            _log.info("draining idle replica %s to make room", victim.replica_id)
            await self._drain(victim, grace_s=30)

    async def _stop_now(self, tracked: _Tracked) -> None:
        await self._command(
            tracked.node_id, {"op": "stop", "replica_id": tracked.replica_id, "grace_s": 0}
        )

    async def _drain(self, tracked: _Tracked, grace_s: float) -> None:
        tracked.draining = True
        await self.records.set_state(tracked.replica_id, ReplicaState.DRAINING)
        await self._command(tracked.node_id, {"op": "stop", "replica_id": tracked.replica_id,
                                              "grace_s": grace_s})  # fmt: skip

    async def _command(self, node_id: str, command: dict[str, object]) -> dict[str, object]:
        subject, body = self.subjects.node_command(node_id), json.dumps(command).encode()
        try:
            reply = await self.nc.request(
                subject,
                body,
                timeout=_COMMAND_TIMEOUT_S,
                headers=self.seals.platform(subject, body),
            )
        except Exception as exc:  # noqa: BLE001 - an unreachable node is an answer too
            return {"ok": False, "error": str(exc)}
        answer: dict[str, object] = json.loads(reply.data)
        return answer


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _state_of(tracked: _Tracked) -> ReplicaState:
    if tracked.draining:
        return ReplicaState.DRAINING
    return ReplicaState.STARTING if tracked.beat is None else ReplicaState(tracked.beat.state)


def _serving(tracked: _Tracked) -> bool:
    """Starting or ready, and not on its way out (a replica may drain itself, e.g. after a
    sync call overran its timeout)."""
    if tracked.draining:
        return False
    return tracked.beat is None or tracked.beat.state in (*_STARTING, ReplicaState.READY)

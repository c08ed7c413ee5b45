"""The job recorder: one per platform (several may run; JetStream shares the work). It writes the
job events replicas publish into PostgreSQL, acking each only after its transaction commits (so
an event is never lost, and a repeat changes nothing); expires old results; and delivers
completion webhooks, claiming each due delivery for a minute so two recorders never send it
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import FetchTimeoutError
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kiln._tasks import cancel_and_wait
from kiln._trouble import Trouble
from kiln.db.enums import LIVE_REPLICA_STATES, CallStatus, WebhookState
from kiln.db.models import App, Call, Function, Invocation, Replica
from kiln.db.session import transaction
from kiln.errors import WorkerLost
from kiln.jobs import webhooks
from kiln.jobs.records import (
    FINISHED,
    apply_event,
    attempt_row,
    call_target,
    call_view,
    expire_finished,
    finish,
    lost_verdict_waits,
)
from kiln.objects import delete_object
from kiln.payloads import PayloadStore
from kiln.seal import Seals
from kiln.settings import Settings, Switch
from kiln.streams import JOB_RECORDER, ensure_consumer, ensure_job_streams
from kiln.wire import JobEvent, JobEventKind, Subjects, decode

__all__ = ["JobRecorder"]

_log = logging.getLogger("kiln.jobs")
_BATCH = 128  # events written per transaction
_SWEEP_EVERY_S = 1.0
_WEBHOOK_CLAIM_S = 60.0
# A job whose lost verdict waits, run this much longer than its function's timeout: its own
# outcome is not coming (its replica's last report was lost with NATS).
_LOST_VERDICT_GRACE_S = 600.0


class JobRecorder:
    def __init__(
        self,
        nc: NATS,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.sessions = sessions
        self.settings = settings
        self.subjects = Subjects(settings.namespace)
        self.clock = clock
        self.ttl_s = settings.job_result_ttl_s
        self.payloads = PayloadStore(self.js, self.subjects, replicas=settings.stream_replicas)
        self.seals = Seals(settings.snapshot_signing_key)

    async def run(self, stop: asyncio.Event) -> None:
        ns = self.settings.namespace
        await ensure_job_streams(self.js, ns, replicas=self.settings.stream_replicas)
        # Created, or brought up to its declaration (an older one may filter other subjects).
        durable = await ensure_consumer(self.js, JOB_RECORDER, ns)
        sub = await self.js.pull_subscribe_bind(durable, stream=self.subjects.job_events_stream)
        async with httpx.AsyncClient() as client:
            loops = [
                asyncio.create_task(self._forever(self._record, sub), name="kiln-jobs-events"),
                asyncio.create_task(self._forever(self._sweep), name="kiln-jobs-sweep"),
                asyncio.create_task(self._forever(self._webhooks, client), name="kiln-jobs-hooks"),
            ]
            try:
                await stop.wait()
            finally:
                await cancel_and_wait(*loops)
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _forever(self, step: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run `step` again and again; a failure is logged and retried after a pause, never
        the end of the loop."""
        trouble = Trouble(_log, f"job recorder step {step.__name__}")
        while True:
            try:
                await step(*args)
                trouble.ok()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop outlives any one failure (DB, NATS)
                trouble.failed(exc)
                await asyncio.sleep(1.0)

    # Events ------------------------------------------------------------------------------------

    async def _record(self, sub: JetStreamContext.PullSubscription) -> None:
        try:
            messages = await sub.fetch(_BATCH, timeout=1.0)
        except (TimeoutError, FetchTimeoutError):
            return
        events = []
        for msg in messages:
            try:
                # The subject names the function of the replica that sent it, and the seal
                # proves it (a replica can have the server publish on any subject: kiln.seal).
                function = msg.subject.split(".")[-2]
                if not self.seals.function_sent(msg, uuid.UUID(hex=function), "a job event"):
                    await msg.term()
                    continue
                events.append((function, decode(JobEvent, msg.data)))
            except (ValueError, TypeError):
                _log.error("dropping an unreadable job event")
                await msg.term()
        await self.record(events)
        for msg in messages:
            with contextlib.suppress(Exception):  # a lost ack: the event comes again, harmless
                await msg.ack()

    async def record(self, events: list[tuple[str, JobEvent]]) -> None:
        """Write job events (each with the function, in hex, whose subject it came on) down, in
        order, in one transaction (the caller acks them after)."""
        now = self.clock()
        stored_bodies: list[tuple[uuid.UUID, str]] = []
        readable = [(function, event) for function, event in events if _readable(event)]
        ids = {uuid.UUID(event.job_id) for _, event in readable}
        if not ids:
            return
        async with transaction(self.sessions) as session:
            calls = {
                call.id: call
                for call in await session.scalars(
                    sa.select(Call).where(Call.id.in_(ids)).order_by(Call.id).with_for_update()
                )
            }
            attempts: list[dict[str, Any]] = []
            alive = await _live_runners(session, calls.values(), readable)
            for function, event in readable:
                call = calls.get(uuid.UUID(event.job_id))
                if call is None:
                    continue  # spawned and withdrawn, or long forgotten
                if call.function_id.hex != function:
                    _log.error("dropping an event of job %s sent by another function", call.id)
                    continue
                runner_alive = call.replica_id in alive
                if (
                    call.status not in FINISHED
                    and event.kind != JobEventKind.STARTED
                    and not lost_verdict_waits(call, event, runner_alive=runner_alive)
                ):
                    attempts.append(attempt_row(call, event, now))
                if (
                    apply_event(call, event, now, self.ttl_s, runner_alive=runner_alive)
                    and call.body_ref is not None
                ):
                    stored_bodies.append((call.function_id, call.body_ref))
                    call.body_ref = None
            if attempts and self.settings.invocation_log is Switch.ON:
                # One row per attempt: a replayed event's row is already there.
                await session.execute(
                    pg.insert(Invocation)
                    .values(attempts)
                    .on_conflict_do_nothing(
                        index_elements=["call_id"], index_where=sa.text("kind = 'job'")
                    )
                )
        for function_id, name in stored_bodies:
            await self.payloads.delete(function_id, name)

    # Expiry ------------------------------------------------------------------------------------

    async def _sweep(self) -> None:
        await asyncio.sleep(_SWEEP_EVERY_S)
        async with transaction(self.sessions) as session:
            bodies = await self._settle_lost(session)
            stored = await expire_finished(session, self.clock(), self.ttl_s)
        for function_id, name in bodies:  # after the commit: NATS is not held in a transaction
            await self.payloads.delete(function_id, name)
        for function_id, name in stored:
            with contextlib.suppress(Exception):  # the bucket's TTL gets it anyway
                bucket = self.subjects.job_results_bucket(function_id)
                await delete_object(self.js, bucket, name)

    async def _settle_lost(self, session: AsyncSession) -> list[tuple[uuid.UUID, str]]:
        """Fail the jobs whose `worker_lost` verdict waited (`lost_verdict_waits`) once the
        replica that ran them is gone after all, or once the job has run longer than its
        function's timeout allows (its own outcome was lost); the stored bodies to delete."""
        now = self.clock()
        waiting = (
            await session.execute(
                sa.select(Call, Replica.state, Function.timeout_s)
                .outerjoin(Replica, Replica.id == Call.replica_id)
                .join(Function, Function.id == Call.function_id)
                .where(Call.status == CallStatus.RUNNING, Call.error_code == WorkerLost.code)
                .with_for_update(of=Call, skip_locked=True)
            )
        ).all()
        bodies = []
        for call, state, timeout_s in waiting:
            overdue = call.started_at is not None and now - call.started_at > timedelta(
                seconds=timeout_s + _LOST_VERDICT_GRACE_S
            )
            if state in LIVE_REPLICA_STATES and not overdue:
                continue
            finish(call, CallStatus.FAILED, now, self.ttl_s, webhooks=True)
            if call.body_ref is not None:
                bodies.append((call.function_id, call.body_ref))
                call.body_ref = None
        return bodies

    # Webhooks ----------------------------------------------------------------------------------

    async def _webhooks(self, client: httpx.AsyncClient) -> None:
        due = await self._claim_due()
        if not due:
            await asyncio.sleep(0.5)
            return
        await asyncio.gather(*(self._deliver(client, *item) for item in due))

    async def _claim_due(self) -> list[tuple[uuid.UUID, str, bytes]]:
        """Due deliveries, each claimed for a minute: (call id, url, body)."""
        now = self.clock()
        async with transaction(self.sessions) as session:
            rows = (
                await session.execute(
                    sa.select(Call, App.name, Function.name)
                    .join(Function, Function.id == Call.function_id)
                    .join(App, App.id == Function.app_id)
                    .where(Call.webhook_state == WebhookState.PENDING, Call.webhook_next_at <= now)
                    .order_by(Call.webhook_next_at)
                    .limit(20)
                    .with_for_update(of=Call, skip_locked=True)
                )
            ).all()
            due = []
            for call, app, function in rows:
                call.webhook_next_at = now + timedelta(seconds=_WEBHOOK_CLAIM_S)
                view = call_view(call, call_target(app, function, call.method), now)
                body = json.dumps(view, separators=(",", ":")).encode()
                due.append((call.id, call.webhook_url or "", body))
        return due

    async def _deliver(
        self, client: httpx.AsyncClient, call_id: uuid.UUID, url: str, body: bytes
    ) -> None:
        secret = self.settings.require("webhook_secret")
        error: str | None = None
        try:
            await webhooks.deliver(client, url, body, secret, str(call_id))
        except httpx.HTTPStatusError as exc:
            error = f"the receiver answered {exc.response.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        async with transaction(self.sessions) as session:
            call = await session.get(Call, call_id, with_for_update=True)
            if call is None:
                return
            call.webhook_attempts += 1
            call.webhook_error = error
            if error is None:
                call.webhook_state = WebhookState.DELIVERED
                call.webhook_next_at = None
            elif call.webhook_attempts >= webhooks.MAX_ATTEMPTS:
                _log.warning("giving up the webhook of job %s: %s", call_id, error)
                call.webhook_state = WebhookState.FAILED
                call.webhook_next_at = None
            else:
                delay = webhooks.retry_delay_s(call.webhook_attempts)
                call.webhook_next_at = self.clock() + timedelta(seconds=delay)


async def _live_runners(
    session: AsyncSession, calls: Iterable[Call], events: Iterable[tuple[str, JobEvent]]
) -> set[uuid.UUID]:
    """Of the replicas that started these jobs (before, or in this batch of events), the ones
    still alive."""
    runners = {call.replica_id for call in calls if call.replica_id is not None}
    runners |= {
        uuid.UUID(event.replica_id)
        for _, event in events
        if event.kind == JobEventKind.STARTED and event.replica_id
    }
    if not runners:
        return set()
    rows = await session.scalars(
        sa.select(Replica.id).where(Replica.id.in_(runners), Replica.state.in_(LIVE_REPLICA_STATES))
    )
    return set(rows)


def _readable(event: JobEvent) -> bool:
    """Whether the event's ids and kind parse: a malformed one is dropped (and logged), so it
    cannot hold back the batch it came in."""
    try:
        uuid.UUID(event.job_id)
        uuid.UUID(event.replica_id)
        JobEventKind(event.kind)
    except (ValueError, TypeError, AttributeError):
        _log.error("dropping a malformed job event: %r", event)
        return False
    return True

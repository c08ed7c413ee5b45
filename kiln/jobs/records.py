"""Job rows in PostgreSQL (`calls`): what a job event changes, what the API shows of a job,
and the queries of the sweeper and the webhook sender.

Events can arrive more than once and out of order (a retry's `started` before the previous
attempt's `failed`, a late `succeeded` after a cancel): a finished job never changes again,
and an attempt's event never overrides a later attempt's.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.db.enums import CallStatus, InvocationKind, InvocationStatus, WebhookState
from kiln.db.models import Call
from kiln.errors import WorkerLost
from kiln.wire import JobEvent, JobEventKind

__all__ = [
    "FINISHED",
    "apply_event",
    "call_target",
    "call_view",
    "expire_finished",
    "finish",
    "is_expired",
    "lost_verdict_waits",
]

FINISHED = (CallStatus.SUCCEEDED, CallStatus.FAILED, CallStatus.CANCELLED, CallStatus.EXPIRED)
# Results up to this size are shown inline in the call's JSON view.
_INLINE_VIEW_BYTES = 1024 * 1024


def call_target(app: str, function: str, method: str | None) -> str:
    """How a job names what it calls: APP/NAME or APP/Class.method."""
    return f"{app}/{function}" + (f".{method}" if method else "")


def is_expired(call: Call, now: datetime) -> bool:
    return call.status is CallStatus.EXPIRED or (
        call.status in FINISHED and call.expires_at is not None and call.expires_at <= now
    )


def finish(
    call: Call, status: CallStatus, now: datetime, ttl_s: float, *, webhooks: bool = True
) -> None:
    """Make `call` finished with `status`: its result kept `ttl_s`, its webhook due now."""
    call.status = status
    call.finished_at = now
    call.expires_at = now + timedelta(seconds=ttl_s)
    call.replica_id = None
    if webhooks and call.webhook_url:
        call.webhook_state = WebhookState.PENDING
        call.webhook_next_at = now


def apply_event(
    call: Call, event: JobEvent, now: datetime, ttl_s: float, *, runner_alive: bool = False
) -> bool:
    """Change `call` as `event` says; whether it finished the call. `runner_alive`: the
    replica that last started the job still lives (see `lost_verdict_waits`)."""
    if call.status in FINISHED:
        return False
    kind = JobEventKind(event.kind)
    if event.attempt < call.attempts and not event.final:
        return False  # an earlier attempt's news, overtaken by a later attempt
    call.attempts = max(call.attempts, event.attempt)
    if kind is JobEventKind.STARTED:
        call.status = CallStatus.RUNNING
        call.started_at = call.started_at or now
        call.replica_id = uuid.UUID(event.replica_id)
        return False
    if kind is JobEventKind.FAILED:
        call.error_code = event.error_code
        call.error_message = event.error_message
        if not event.final:
            call.status = CallStatus.QUEUED  # waits for its next attempt
            call.replica_id = None
            return False
        if lost_verdict_waits(call, event, runner_alive=runner_alive):
            return False  # still running; the recorder's sweep ends it if its replica dies
        finish(call, CallStatus.FAILED, now, ttl_s)
        return True
    if kind is JobEventKind.SUCCEEDED:
        call.error_code = call.error_message = None
        call.result_content_type = event.content_type
        if event.result_ref is not None:
            call.result_ref = event.result_ref
        else:
            call.result = base64.b64decode(event.result_b64 or "")
        finish(call, CallStatus.SUCCEEDED, now, ttl_s)
        return True
    finish(call, CallStatus.CANCELLED, now, ttl_s)
    return True


def lost_verdict_waits(call: Call, event: JobEvent, *, runner_alive: bool) -> bool:
    """Whether a `worker_lost` verdict must wait. A replica says so when it gets a job again
    beyond its attempts: the queue's ack wait ran out, so the replicas that ran it were taken
    for dead. But NATS away longer than that wait does the same to a job whose replica lives
    and is finishing it. So while the replica that started the job lives, the job stays
    running (with the verdict noted): its own outcome, or its replica's death, settles it."""
    return (
        runner_alive
        and event.final
        and event.error_code == WorkerLost.code
        and call.replica_id is not None
        and call.status is CallStatus.RUNNING
    )


def attempt_row(call: Call, event: JobEvent, now: datetime) -> dict[str, Any]:
    """The invocation log row of the job attempt that `event` ends. Its queue wait runs from
    the spawn to the attempt's start (earlier attempts and their backoffs included), its
    duration from the spawn to its end."""
    run_s = event.run_s or 0.0
    started = now - timedelta(seconds=run_s)
    kind = JobEventKind(event.kind)
    status = {
        JobEventKind.SUCCEEDED: InvocationStatus.SUCCEEDED,
        JobEventKind.CANCELLED: InvocationStatus.CANCELLED,
    }.get(kind, InvocationStatus.FAILED)
    return {
        "customer_id": call.customer_id,
        "function_id": call.function_id,
        "version_id": call.version_id,
        "replica_id": uuid.UUID(event.replica_id) if event.replica_id else None,
        "call_id": f"{call.id}:{event.attempt}",
        "method": call.method,
        "kind": InvocationKind.JOB,
        "status": status,
        "error_code": event.error_code if status is InvocationStatus.FAILED else None,
        "started_at": started,
        "queue_wait_ms": _ms_between(call.created_at, started),
        "execution_ms": None if event.run_s is None else round(run_s * 1000),
        "duration_ms": _ms_between(call.created_at, now),
        "bytes_in": call.bytes_in,
        "bytes_out": event.bytes_out,
        "cold_start": event.cold,
    }


def _ms_between(start: datetime, end: datetime) -> int:
    return max(0, round((end - start).total_seconds() * 1000))


def call_view(call: Call, target: str, now: datetime) -> dict[str, Any]:
    """A job as `GET /v1/calls/ID` (and its webhook) shows it."""
    expired = is_expired(call, now)
    status = CallStatus.EXPIRED if expired else call.status
    view: dict[str, Any] = {
        "call_id": str(call.id),
        "function": target,
        "status": status.value,
        "attempts": call.attempts,
        "max_attempts": call.max_retries + 1,
        "created_at": _time(call.created_at),
        "started_at": _time(call.started_at),
        "finished_at": _time(call.finished_at),
        "expires_at": _time(call.expires_at),
        "error": (
            {"code": call.error_code, "message": call.error_message}
            if call.error_code is not None
            else None
        ),
    }
    if status is CallStatus.SUCCEEDED:
        view["result_url"] = f"/v1/calls/{call.id}/result"
        inline = call.result
        if (
            inline is not None
            and call.result_content_type == "application/json"
            and len(inline) <= _INLINE_VIEW_BYTES
        ):
            view["result"] = json.loads(inline)
    return view


async def expire_finished(
    session: AsyncSession, now: datetime, ttl_s: float
) -> list[tuple[uuid.UUID, str]]:
    """Mark expired the finished jobs past their time and drop their results (and forget jobs
    expired a whole TTL ago); the stored results to delete, as (function id, name)."""
    rows = (
        await session.execute(
            sa.select(Call.id, Call.function_id, Call.result_ref)
            .where(Call.status.in_(FINISHED[:3]), Call.expires_at <= now)
            .with_for_update(skip_locked=True)
            .limit(1000)
        )
    ).all()
    if rows:
        await session.execute(
            sa.update(Call)
            .where(Call.id.in_([row.id for row in rows]))
            .values(status=CallStatus.EXPIRED, result=None, result_ref=None)
        )
    await session.execute(
        sa.delete(Call).where(
            Call.status == CallStatus.EXPIRED,
            Call.expires_at <= now - timedelta(seconds=ttl_s),
        )
    )
    return [(row.function_id, row.result_ref) for row in rows if row.result_ref]


def _time(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value is not None else None

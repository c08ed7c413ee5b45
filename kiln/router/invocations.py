"""`GET /v1/functions/APP/FN/calls`: a function's recent calls from the invocation log, for
its owner; `GET /v1/functions/APP/FN/stats`: their counts and latency percentiles by hour."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.db.enums import InvocationStatus
from kiln.db.models import Invocation
from kiln.db.session import transaction
from kiln.router.bodies import CallsQuery, StatsQuery
from kiln.router.control import control_principal, owned_function
from kiln.router.services import services
from kiln.router.validation import read_query
from kiln.router.views import (
    CallStats,
    FunctionStats,
    HourStats,
    Invocations,
    InvocationView,
    dump,
)

__all__ = ["function_stats", "list_calls"]


async def list_calls(request: Request) -> Response:
    """`GET /v1/functions/APP/FN/calls`: the function's calls, newest first. Query: `limit`
    (1 to 1000, default 50), `before` (a row id from an earlier page's `next_before`), `since` and
    `until` (ISO times, or `since` as a span such as 1h), `status` (succeeded, failed,
    cancelled), `kind` (sync, stream, websocket, job)."""
    svc = services(request)
    principal = await control_principal(request)
    asked = read_query(request, CallsQuery)
    limit = asked.limit
    since = asked.since or datetime.min.replace(tzinfo=UTC)
    until = asked.until or datetime.max.replace(tzinfo=UTC)
    table = Invocation.__table__.c
    where = [table.started_at >= since, table.started_at < until]
    if asked.before is not None:
        where.append(table.id < asked.before)
    if asked.status is not None:
        where.append(table.status == asked.status.value)
    if asked.kind is not None:
        where.append(table.kind == asked.kind.value)
    async with transaction(svc.sessions) as session:
        function = await owned_function(session, request, principal)
        rows = await session.execute(
            sa.select(*Invocation.__table__.c)
            .where(table.function_id == function.id, *where)
            .order_by(table.id.desc())
            .limit(limit)
        )
        views = [_view(row._mapping) for row in rows]
    next_before = views[-1].id if len(views) == limit else None
    return JSONResponse(dump(Invocations(calls=views, next_before=next_before)))


def _view(row: Any) -> InvocationView:
    def text(value: uuid.UUID | None) -> str | None:
        return None if value is None else str(value)

    return InvocationView(
        **{
            "id": row["id"],
            "call_id": row["call_id"],
            "request_id": row["request_id"],
            "kind": row["kind"],
            "method": row["method"],
            "status": row["status"],
            "error_code": row["error_code"],
            "customer_id": text(row["customer_id"]),
            "version_id": text(row["version_id"]),
            "replica_id": text(row["replica_id"]),
            "started_at": row["started_at"].isoformat(),
            "queue_wait_ms": row["queue_wait_ms"],
            "execution_ms": row["execution_ms"],
            "duration_ms": row["duration_ms"],
            "bytes_in": row["bytes_in"],
            "bytes_out": row["bytes_out"],
            "cold_start": row["cold_start"],
            "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": row["completion_tokens"],
            "voice_turns": row["voice_turns"],
        }
    )


def _aggregates(table: Any) -> list[Any]:
    failed = table.status == InvocationStatus.FAILED
    return [
        sa.func.count().label("requests"),
        sa.func.count().filter(failed).label("errors"),
        sa.func.count().filter(table.cold_start).label("cold_starts"),
        *(
            sa.func.percentile_cont(q).within_group(table.duration_ms).label(f"p{round(q * 100)}")
            for q in (0.5, 0.95, 0.99)
        ),
    ]


def _stats(row: Any) -> dict[str, Any]:
    def ms(value: float | None) -> float | None:
        return None if value is None else round(float(value), 1)

    return {
        "requests": row.requests,
        "errors": row.errors,
        "cold_starts": row.cold_starts,
        "p50_ms": ms(row.p50),
        "p95_ms": ms(row.p95),
        "p99_ms": ms(row.p99),
    }


async def function_stats(request: Request) -> Response:
    """`GET /v1/functions/APP/FN/stats?hours=24`: the function's calls in the last `hours`
    (1 to 744), in total and by hour: requests, failures, cold starts, and the p50, p95 and p99
    of their duration."""
    svc = services(request)
    principal = await control_principal(request)
    hours = read_query(request, StatsQuery).hours
    table = Invocation.__table__.c
    since = datetime.now(UTC) - timedelta(hours=hours)
    async with transaction(svc.sessions) as session:
        function = await owned_function(session, request, principal)
        where = [table.function_id == function.id, table.started_at >= since]
        hour = sa.func.date_trunc("hour", table.started_at)
        # One pass over the rows: by hour, and the whole span (the row whose hour is NULL,
        # there even when no call was made).
        rows = (
            await session.execute(
                sa.select(hour.label("hour"), *_aggregates(table))
                .where(*where)
                .group_by(sa.func.grouping_sets(hour, sa.text("()")))
                .order_by(hour.nulls_last())
            )
        ).all()
        *hourly, total = rows
        by_hour = [HourStats(hour=row.hour.isoformat(), **_stats(row)) for row in hourly]
    view = FunctionStats(hours=hours, total=CallStats(**_stats(total)), by_hour=by_hour)
    return JSONResponse(dump(view))

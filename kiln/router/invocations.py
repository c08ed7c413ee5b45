"""`GET /v1/functions/APP/FN/calls`: a function's recent calls from the invocation log, for
its owner."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.db.enums import InvocationKind, InvocationStatus
from kiln.db.models import Invocation
from kiln.db.session import transaction
from kiln.errors import InvalidRequest
from kiln.router.control import control_principal, owned_function
from kiln.router.moments import moment_param
from kiln.router.services import services

__all__ = ["list_calls"]

_DEFAULT_LIMIT = 50
_MAX_LIMIT = 1000


async def list_calls(request: Request) -> Response:
    """`GET /v1/functions/APP/FN/calls`: the function's calls, newest first. Query: `limit`
    (1 to 1000, default 50), `before` (a row id from an earlier page's `next_before`), `since` and
    `until` (ISO times, or `since` as a span such as 1h), `status` (succeeded, failed,
    cancelled), `kind` (sync, stream, websocket, job)."""
    svc = services(request)
    principal = await control_principal(request)
    query = request.query_params
    limit = _int_param(query.get("limit"), "limit", _DEFAULT_LIMIT, 1, _MAX_LIMIT)
    before = _int_param(query.get("before"), "before", None, 1, 2**63 - 1)
    since = moment_param(request, "since", datetime.min.replace(tzinfo=UTC), spans=True)
    until = moment_param(request, "until", datetime.max.replace(tzinfo=UTC))
    table = Invocation.__table__.c
    where = [table.started_at >= since, table.started_at < until]
    if before is not None:
        where.append(table.id < before)
    for name, kind in (("status", InvocationStatus), ("kind", InvocationKind)):
        raw = query.get(name)
        if raw is not None:
            try:
                where.append(table[name] == kind(raw).value)
            except ValueError:
                allowed = ", ".join(k.value for k in kind)
                raise InvalidRequest(
                    f"{name}={raw!r} is not valid: expected one of {allowed}"
                ) from None
    async with transaction(svc.sessions) as session:
        function = await owned_function(session, request, principal)
        rows = await session.execute(
            sa.select(*Invocation.__table__.c)
            .where(table.function_id == function.id, *where)
            .order_by(table.id.desc())
            .limit(limit)
        )
        views = [_view(row._mapping) for row in rows]
    next_before = views[-1]["id"] if len(views) == limit else None
    return JSONResponse({"calls": views, "next_before": next_before})


def _view(row: Any) -> dict[str, Any]:
    def text(value: uuid.UUID | None) -> str | None:
        return None if value is None else str(value)

    return {
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
    }


def _int_param(raw: str | None, name: str, default: int | None, low: int, high: int) -> int | None:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise InvalidRequest(
            f"{name}={raw!r} is not valid: expected a whole number {low} to {high}"
        )
    return value

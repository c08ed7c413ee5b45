"""Billing reports: `GET /v1/billing/usage` (a customer's, or one an operator names) and
`GET /v1/billing/revenue` (operators), as JSON or, with `format=csv`, CSV."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.billing.reports import GROUPS, Granularity, UsageQuery, revenue_rows, to_csv, usage_rows
from kiln.db.enums import ApiKeyKind
from kiln.db.session import transaction
from kiln.errors import InvalidRequest, PermissionDenied
from kiln.router.billing import account_of
from kiln.router.moments import moment_param
from kiln.router.services import services

__all__ = ["revenue", "usage"]

_DEFAULT_DAYS = 30
_MAX_HOURS = 24 * 93  # hourly rows for about three months at most


def _window(request: Request) -> tuple[datetime, datetime, Granularity]:
    now = datetime.now(UTC)
    until = moment_param(request, "until", now)
    since = moment_param(request, "since", until - timedelta(days=_DEFAULT_DAYS))
    raw = request.query_params.get("granularity", "day")
    try:
        granularity = Granularity(raw)
    except ValueError:
        raise InvalidRequest(f"granularity={raw!r} is not valid: expected hour or day") from None
    if since >= until:
        raise InvalidRequest(f"since ({since.isoformat()}) must come before until")
    if granularity is Granularity.HOUR and until - since > timedelta(hours=_MAX_HOURS):
        raise InvalidRequest("hourly reports cover at most 93 days; narrow since and until")
    return since, until, granularity


def _answer(request: Request, rows: list[dict[str, object]], columns: list[str]) -> Response:
    form = request.query_params.get("format", "json")
    if form == "csv":
        return Response(to_csv(rows, columns), media_type="text/csv; charset=utf-8")
    if form != "json":
        raise InvalidRequest(f"format={form!r} is not valid: expected json or csv")
    return JSONResponse({"rows": rows})


async def usage(request: Request) -> Response:
    """`group_by` (function, gpu_type, both comma-separated, or none), `granularity` (hour or
    day), `since` and `until` (default: the last 30 days), `format` (json or csv)."""
    svc = services(request)
    _, customer_id = await account_of(request)
    since, until, granularity = _window(request)
    raw = request.query_params.get("group_by", ",".join(GROUPS))
    group_by = [g.strip() for g in raw.split(",") if g.strip() and g.strip() != "none"]
    unknown = sorted(set(group_by) - set(GROUPS))
    if unknown:
        raise InvalidRequest(
            f"group_by={raw!r} is not valid: expected function, gpu_type, both or none"
        )
    query = UsageQuery(customer_id, since, until, granularity, tuple(group_by))
    async with transaction(svc.sessions) as session:
        rows = await usage_rows(session, query)
    columns = ["period", *group_by, "replica_seconds", "calls", "cost_micros"]
    return _answer(request, rows, columns)


async def revenue(request: Request) -> Response:
    svc = services(request)
    principal = await svc.auth.authenticate(request)
    if principal.kind is not ApiKeyKind.OPERATOR:
        raise PermissionDenied("the revenue report needs an operator key")
    since, until, granularity = _window(request)
    async with transaction(svc.sessions) as session:
        rows = await revenue_rows(session, since, until, granularity)
    columns = ["period", "tier", "customers", "replica_seconds", "usage_revenue_micros",
               "payments_micros"]  # fmt: skip
    return _answer(request, rows, columns)

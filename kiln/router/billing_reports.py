"""Billing reports: `GET /v1/billing/usage` (a customer's, or one an operator names) and
`GET /v1/billing/revenue` (operators), as JSON or, with `format=csv`, CSV."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.billing.reports import Granularity, UsageQuery, revenue_rows, to_csv, usage_rows
from kiln.db.enums import ApiKeyKind
from kiln.db.session import transaction
from kiln.errors import InvalidRequest, PermissionDenied
from kiln.router import bodies
from kiln.router.billing import account_for, billing_principal
from kiln.router.services import services
from kiln.router.validation import read_query
from kiln.router.views import Report, dump

__all__ = ["revenue", "usage"]

_DEFAULT_DAYS = 30
_MAX_HOURS = 24 * 93  # hourly rows for about three months at most


def _window(
    asked: bodies.UsageQuery | bodies.RevenueQuery,
) -> tuple[datetime, datetime, Granularity]:
    until = asked.until or datetime.now(UTC)
    try:
        since = asked.since or until - timedelta(days=_DEFAULT_DAYS)
    except OverflowError:  # an `until` in the first month of year 1
        since = datetime.min.replace(tzinfo=UTC)
    granularity = asked.granularity
    if since >= until:
        raise InvalidRequest(f"since ({since.isoformat()}) must come before until")
    if granularity is Granularity.HOUR and until - since > timedelta(hours=_MAX_HOURS):
        raise InvalidRequest("hourly reports cover at most 93 days; narrow since and until")
    return since, until, granularity


def _answer(form: str, rows: list[dict[str, object]], columns: list[str]) -> Response:
    if form == "csv":
        return Response(to_csv(rows, columns), media_type="text/csv; charset=utf-8")
    return JSONResponse(dump(Report(rows=rows)))


async def usage(request: Request) -> Response:
    """`group_by` (function, gpu_type, both comma-separated, or none), `granularity` (hour or
    day), `since` and `until` (default: the last 30 days), `format` (json or csv)."""
    svc = services(request)
    principal = await billing_principal(request)
    asked = read_query(request, bodies.UsageQuery)
    _, customer_id = account_for(principal, asked.customer_id)
    since, until, granularity = _window(asked)
    group_by = asked.groups()
    query = UsageQuery(customer_id, since, until, granularity, tuple(group_by))
    async with transaction(svc.sessions) as session:
        rows = await usage_rows(session, query)
    columns = ["period", *group_by, "replica_seconds", "calls", "cost_micros"]
    return _answer(asked.format, rows, columns)


async def revenue(request: Request) -> Response:
    svc = services(request)
    principal = await svc.auth.authenticate(request)
    if principal.kind is not ApiKeyKind.OPERATOR:
        raise PermissionDenied("the revenue report needs an operator key")
    asked = read_query(request, bodies.RevenueQuery)
    since, until, granularity = _window(asked)
    async with transaction(svc.sessions) as session:
        rows = await revenue_rows(session, since, until, granularity)
    columns = ["period", "tier", "customers", "replica_seconds", "usage_revenue_micros",
               "payments_micros"]  # fmt: skip
    return _answer(asked.format, rows, columns)

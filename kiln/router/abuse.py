"""Abuse signals: every refused request (401, 403, 429) and every error (5xx) of a known
customer is counted, per tier in Prometheus (`kiln_router_customer_rejections_total`: tiers keep
the label set bounded) and per customer in Redis, in one-minute buckets kept two hours, for
`GET /v1/abuse?window=SECONDS` (operator keys): the customers with the most refusals.

Counting never slows or fails a request: the Redis write is a task of its own, and a failure
is dropped (and logged once in a while).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.db.enums import ApiKeyKind
from kiln.errors import InvalidRequest, PermissionDenied
from kiln.router.auth import SCOPE_CUSTOMER
from kiln.router.bodies import ABUSE_BUCKET_S, ABUSE_KEEP_S, AbuseQuery
from kiln.router.services import services
from kiln.router.validation import read_query
from kiln.router.views import AbuseCount, AbuseReport, dump

__all__ = ["SCOPE_CUSTOMER", "AbuseSignals", "list_abuse"]

_log = logging.getLogger(__name__)
_BUCKET_S = ABUSE_BUCKET_S
_KEEP_S = ABUSE_KEEP_S
_TOP = 20


def _kind(status: int) -> str | None:
    if status in (401, 403):
        return "refused"
    if status == 429:
        return "rate_limited"
    if status >= 500:
        return "error"
    return None


class AbuseSignals:
    def __init__(self, redis: Any, prefix: str, count_metric: Any) -> None:
        self.redis = redis
        self.prefix = f"{prefix}abuse:"
        self.count_metric = count_metric  # (tier, kind) -> None
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_warning = 0.0

    def record(self, customer: str, tier: str, status: int) -> None:
        kind = _kind(status)
        if kind is None:
            return
        self.count_metric(tier, kind)
        if self.redis is None or len(self._tasks) > 1000:  # Redis slow: drop, never pile up
            return
        task = asyncio.ensure_future(self._write(customer, kind))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, customer: str, kind: str) -> None:
        bucket = int(time.time()) // _BUCKET_S
        key = f"{self.prefix}{bucket}"
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(key, f"{customer}|{kind}", 1)
                pipe.expire(key, _KEEP_S)
                await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - a signal lost is better than a request slowed
            if time.monotonic() - self._last_warning > 60:
                self._last_warning = time.monotonic()
                _log.warning("abuse counters unavailable: %s", exc)

    async def top(self, window_s: int) -> list[dict[str, Any]]:
        """The customers with the most refusals in the last `window_s` seconds."""
        now = int(time.time()) // _BUCKET_S
        buckets = range(now - window_s // _BUCKET_S, now + 1)
        totals: dict[str, Counter[str]] = {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for bucket in buckets:
                pipe.hgetall(f"{self.prefix}{bucket}")
            results = await pipe.execute()
        for counts in results:
            for field, value in counts.items():
                customer, _, kind = _text(field).partition("|")
                totals.setdefault(customer, Counter())[kind] += int(value)
        ranked = sorted(totals.items(), key=lambda item: -sum(item[1].values()))[:_TOP]
        return [
            {
                "customer_id": customer,
                "total": sum(counts.values()),
                "refused": counts["refused"],
                "rate_limited": counts["rate_limited"],
                "errors": counts["error"],
            }
            for customer, counts in ranked
        ]


async def list_abuse(request: Request) -> Response:
    svc = services(request)
    principal = await svc.auth.authenticate(request)
    if principal.kind is not ApiKeyKind.OPERATOR:
        raise PermissionDenied("abuse reports need an operator key")
    window = read_query(request, AbuseQuery).window
    if svc.abuse.redis is None:
        raise InvalidRequest("abuse reports need Redis (KILN_REDIS_URL)")
    customers = await svc.abuse.top(window)
    report = AbuseReport(window_s=window, customers=[AbuseCount(**c) for c in customers])
    return JSONResponse(dump(report))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

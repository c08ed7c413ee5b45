"""Per-customer request limits: a per-minute rate (GCRA, with a burst), day and month quotas, and
a cap on calls in flight, checked together in Redis by one Lua script (atomic, one round trip).

GCRA: each customer has a theoretical arrival time (TAT); a request at `now` is let in when
max(TAT, now) + T - now <= burst * T (T = 60 s / per_minute), and moves the TAT on by T. So a
customer may send `burst` requests at once and then one every T: over any time t, at most
burst + t / T. Calls in flight are members of a sorted set scored by their deadline, so a call
whose router died stops counting once its deadline passes; every other ending releases it.

If Redis cannot be reached, each router limits on its own with the limits divided by the
number of routers it hears (`<ns>.routers`): never unlimited, never refusing everything; the
`kiln_router_rate_limit_fallback` gauge says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from kiln._tasks import cancel_and_wait
from kiln.errors import RateLimited
from kiln.seal import Seals
from kiln.tiers import TierLimits, with_overrides

__all__ = ["Limiter"]

_log = logging.getLogger(__name__)
_REDIS_RETRY_S = 1.0  # while Redis fails, try it again at most this often


# One round trip: check every limit, and only if all pass, count the request against them.
_ADMIT = """
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local day_limit = tonumber(ARGV[4])
local month_limit = tonumber(ARGV[5])
local cap = tonumber(ARGV[6])
local token = ARGV[7]
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
if new_tat - now > burst * interval then
  return {0, 'per_minute', new_tat - now - burst * interval, 0, tat - now}
end
if day_limit >= 0 and tonumber(redis.call('GET', KEYS[2]) or 0) >= day_limit then
  return {0, 'per_day', tonumber(ARGV[10]) * 1000, 0, tat - now}
end
if month_limit >= 0 and tonumber(redis.call('GET', KEYS[3]) or 0) >= month_limit then
  return {0, 'per_month', tonumber(ARGV[11]) * 1000, 0, tat - now}
end
if token ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  if redis.call('ZCARD', KEYS[4]) >= cap then
    return {0, 'concurrent', 1000, 0, tat - now}
  end
  redis.call('ZADD', KEYS[4], tonumber(ARGV[8]), token)
  redis.call('PEXPIRE', KEYS[4], math.ceil(tonumber(ARGV[8]) - now) + 60000)
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(new_tat - now) + 1000)
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[10]) + 3600)
redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[11]) + 86400)
return {1, '', 0, math.floor((burst * interval - (new_tat - now)) / interval), new_tat - now}
"""


class Limiter:
    def __init__(
        self,
        redis: Any,
        prefix: str,
        tiers: Mapping[str, TierLimits],
        *,
        on_fallback: Callable[[bool], None] = lambda on: None,
        on_limited: Callable[[str, str], None] = lambda tier, limit: None,
    ) -> None:
        self.redis = redis
        self.prefix = f"{prefix}limits:"
        self.tiers = tiers
        self.on_fallback = on_fallback
        self.on_limited = on_limited
        self._script: Any = redis.register_script(_ADMIT) if redis is not None else None
        self._local = _LocalLimiter()
        self._routers: dict[str, float] = {}
        self._router_id = secrets.token_hex(6)
        self._fallback = False
        self._redis_retry_at = 0.0
        self._presence: asyncio.Task[None] | None = None
        self.seals = Seals(None)  # start() gives the platform's

    def limits_for(self, tier: str, overrides: Any) -> TierLimits:
        return with_overrides(self.tiers[tier], overrides)

    async def start(self, nc: NATS, subject: str, *, seals: Seals) -> None:
        """Announce this router on `subject` and count the others (for the fallback), under
        the platform's seal."""
        self.seals = seals
        await nc.subscribe(subject, cb=self._on_router)
        self._presence = asyncio.create_task(self._announce(nc, subject), name="kiln-presence")

    async def close(self) -> None:
        await cancel_and_wait(self._presence)

    async def admit(self, customer: str, tier: str, limits: TierLimits) -> None:
        """Count one request; RateLimited (429) when a limit says no."""
        await self._check(customer, tier, limits, None, 0.0)

    @contextlib.asynccontextmanager
    async def call_slot(
        self, customer: str, tier: str, limits: TierLimits, hold_s: float
    ) -> AsyncIterator[None]:
        """Count one request and hold one of the customer's in-flight slots while inside (at
        most `hold_s`, should this router die without releasing it)."""
        token = secrets.token_hex(8)
        where = await self._check(customer, tier, limits, token, hold_s)
        try:
            yield
        finally:
            if where == "redis":
                with contextlib.suppress(Exception):  # it expires at its deadline anyway
                    await self.redis.zrem(self._key(customer, "inflight"), token)
            else:
                self._local.release(customer, token)

    async def _check(
        self, customer: str, tier: str, limits: TierLimits, token: str | None, hold_s: float
    ) -> str:
        now = datetime.now(UTC)
        day_left = _seconds_to(now + timedelta(days=1), now, day=True)
        month_left = _seconds_to(_next_month(now), now, day=False)
        if self._script is not None and time.monotonic() >= self._redis_retry_at:
            try:
                result = await self._script(
                    keys=[self._key(customer, "gcra"), self._key(customer, f"d:{now:%Y-%m-%d}"),
                          self._key(customer, f"m:{now:%Y-%m}"), self._key(customer, "inflight")],
                    args=[time.time() * 1000, 60_000 / limits.per_minute, limits.burst_size,
                          _limit(limits.per_day), _limit(limits.per_month), limits.concurrent,
                          token or "", (time.time() + hold_s) * 1000, 0, day_left, month_left],
                )  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - Redis down: limit locally instead
                self._set_fallback(True, exc)
                # Not every request should wait out a timeout while Redis is away.
                self._redis_retry_at = time.monotonic() + _REDIS_RETRY_S
            else:
                self._set_fallback(False)
                allowed, which, retry_ms, _remaining, reset_ms = result
                if not int(allowed):
                    self._refuse(tier, limits, _text(which), float(retry_ms), float(reset_ms))
                return "redis"
        routers = max(1, sum(1 for seen in self._routers.values() if time.monotonic() - seen < 6))
        refused = self._local.check(customer, limits, routers, token, hold_s, now)
        if refused is not None:
            self._refuse(tier, limits, *refused)
        return "local"

    def _refuse(
        self, tier: str, limits: TierLimits, which: str, retry_ms: float, reset_ms: float
    ) -> None:
        self.on_limited(tier, which)
        retry_s = max(1, math.ceil(retry_ms / 1000))
        limit = {
            "per_minute": limits.per_minute, "per_day": limits.per_day,
            "per_month": limits.per_month, "concurrent": limits.concurrent,
        }[which]  # fmt: skip
        what = {
            "per_minute": f"{limits.per_minute} requests a minute",
            "per_day": f"{limits.per_day} requests a day",
            "per_month": f"{limits.per_month} requests a month",
            "concurrent": f"{limits.concurrent} calls at once",
        }[which]
        raise RateLimited(
            f"rate limit reached: this account may make {what}; retry in {retry_s} s",
            retry_after=retry_s,
            headers={
                "X-RateLimit-Limit": str(limit),
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(max(retry_s, math.ceil(reset_ms / 1000))),
            },
        )

    def _set_fallback(self, on: bool, exc: BaseException | None = None) -> None:
        if on != self._fallback:
            self._fallback = on
            self.on_fallback(on)
            if on:
                _log.warning("rate limits fall back to this router alone: Redis failed (%s)", exc)
            else:
                _log.info("rate limits are shared through Redis again")

    def _key(self, customer: str, what: str) -> str:
        return f"{self.prefix}{customer}:{what}"

    async def _announce(self, nc: NATS, subject: str) -> None:
        while True:
            body = self._router_id.encode()
            with contextlib.suppress(Exception):
                await nc.publish(subject, body, headers=self.seals.platform(subject, body))
            await asyncio.sleep(2.0)

    async def _on_router(self, msg: Msg) -> None:
        if not self.seals.platform_sent(msg, "a router's announcement"):
            return
        self._routers[msg.data.decode(errors="replace")] = time.monotonic()


class _LocalLimiter:
    """The same limits in this process alone, each divided by the number of routers."""

    def __init__(self) -> None:
        self.tat: dict[str, float] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.inflight: dict[str, dict[str, float]] = {}

    def check(
        self,
        customer: str,
        limits: TierLimits,
        routers: int,
        token: str | None,
        hold_s: float,
        now: datetime,
    ) -> tuple[str, float, float] | None:
        clock = time.monotonic() * 1000
        interval = 60_000 / limits.per_minute * routers
        burst = max(1, limits.burst_size // routers)
        tat = max(self.tat.get(customer, clock), clock)
        new_tat = tat + interval
        if new_tat - clock > burst * interval:
            return "per_minute", new_tat - clock - burst * interval, tat - clock
        day, month = (customer, f"d:{now:%Y-%m-%d}"), (customer, f"m:{now:%Y-%m}")
        for key, limit, name in ((day, limits.per_day, "per_day"),
                                 (month, limits.per_month, "per_month")):  # fmt: skip
            if limit is not None and self.counts.get(key, 0) >= max(1, limit // routers):
                return name, 3_600_000, tat - clock
        if token is not None:
            slots = self.inflight.setdefault(customer, {})
            for held, deadline in list(slots.items()):
                if deadline <= clock:
                    del slots[held]
            if len(slots) >= max(1, limits.concurrent // routers):
                return "concurrent", 1000, tat - clock
            slots[token] = clock + hold_s * 1000
        self.tat[customer] = new_tat
        self.counts[day] = self.counts.get(day, 0) + 1
        self.counts[month] = self.counts.get(month, 0) + 1
        return None

    def release(self, customer: str, token: str) -> None:
        self.inflight.get(customer, {}).pop(token, None)


def _limit(value: int | None) -> int:
    return -1 if value is None else value


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _seconds_to(later: datetime, now: datetime, *, day: bool) -> int:
    if day:
        later = later.replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, int((later - now).total_seconds()))


def _next_month(now: datetime) -> datetime:
    first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first + timedelta(days=32)).replace(day=1)

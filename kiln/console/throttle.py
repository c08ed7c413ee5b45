"""Attempts at guessing: sign-ins and password resets counted per account and per address in
Redis (fixed windows, shared by every router), refused once a window holds its limit.

Should Redis be unreachable, each router counts on its own: an attacker then gets at most the
limit once per router, never an unlimited run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from kiln._trouble import Trouble
from kiln.errors import RateLimited

__all__ = ["Rule", "Throttle"]

_log = logging.getLogger("kiln.console")


@dataclass(frozen=True)
class Rule:
    what: str  # "login", "reset": part of the key, and of the refusal
    limit: int  # attempts per window
    window_s: int


# Count an attempt and start the window with the first one, atomically (an EXPIRE lost after
# the INCR would lock the subject out for good); Redis before 7 has no EXPIRE ... NX.
_COUNT = """
local attempts = redis.call('INCR', KEYS[1])
local ttl = redis.call('TTL', KEYS[1])
if ttl < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {attempts, ttl}
"""


class Throttle:
    def __init__(self, redis: Any, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self._trouble = Trouble(_log, "counting console sign-in attempts in Redis")
        self._local: dict[str, tuple[float, int]] = {}  # key: (window's end, attempts)

    async def attempt(self, *counted: tuple[Rule, str]) -> None:
        """Count one attempt against each (rule, subject) pair (an address, an account);
        `RateLimited` when any of them has used up its window."""
        wait, what = 0, ""
        for rule, subject in counted:
            waits = await self._count(f"{self.prefix}console:{rule.what}:{subject}", rule)
            if waits > wait:
                wait, what = waits, rule.what
        if wait > 0:
            minutes = max(1, round(wait / 60))
            later = f"{minutes} minute{'s' * (minutes > 1)}"
            raise RateLimited(f"too many {what} attempts; try again in {later}", retry_after=wait)

    async def _count(self, key: str, rule: Rule) -> int:
        """Seconds to wait before the next attempt is let in (0: let this one in)."""
        try:
            attempts, ttl = await self.redis.eval(_COUNT, 1, key, rule.window_s)
        except Exception as exc:  # noqa: BLE001 - Redis away: count in this router instead
            self._trouble.failed(exc)
            return self._count_here(key, rule)
        self._trouble.ok()
        return max(1, int(ttl)) if int(attempts) > rule.limit else 0

    def _count_here(self, key: str, rule: Rule) -> int:
        now = time.monotonic()
        ends, attempts = self._local.get(key, (now + rule.window_s, 0))
        if ends <= now:
            ends, attempts = now + rule.window_s, 0
        self._local[key] = (ends, attempts + 1)
        if len(self._local) > 100_000:  # a flood of addresses: forget the oldest windows
            for old in [k for k, (e, _) in self._local.items() if e <= now]:
                del self._local[old]
        return max(1, round(ends - now)) if attempts + 1 > rule.limit else 0

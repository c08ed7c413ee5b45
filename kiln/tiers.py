"""Customer tiers and their limits (standard library only: settings validate them).

Defaults per tier (issue 7), changed platform-wide by `KILN_TIER_LIMITS` and per customer by
its `limit_overrides`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["DEFAULT_TIERS", "TierLimits", "parse_tier_limits", "with_overrides"]


@dataclass(frozen=True)
class TierLimits:
    per_minute: int
    per_day: int | None
    per_month: int | None
    concurrent: int
    max_replicas: int
    burst: int | None = None  # requests at once; default a minute's worth
    # Calls need a positive prepaid balance (else 402); False: usage is invoiced afterwards.
    prepaid: bool = True

    @property
    def burst_size(self) -> int:
        return self.burst if self.burst is not None else self.per_minute

    def describe(self) -> str:
        """`10/min, 1,000/day, 10,000/month, 2 at once, 1 replica, prepaid`, for the docs."""
        parts = [f"{self.per_minute:,}/min"]
        if self.burst is not None:
            parts.append(f"bursts of {self.burst:,}")
        parts.append(f"{self.per_day:,}/day" if self.per_day is not None else "no daily cap")
        parts.append(
            f"{self.per_month:,}/month" if self.per_month is not None else "no monthly cap"
        )
        replicas = "replica" if self.max_replicas == 1 else "replicas"
        parts += [f"{self.concurrent:,} at once", f"{self.max_replicas:,} {replicas}"]
        parts.append("prepaid" if self.prepaid else "invoiced")
        return ", ".join(parts)


DEFAULT_TIERS: Mapping[str, TierLimits] = {
    "free": TierLimits(per_minute=10, per_day=1_000, per_month=10_000, concurrent=2,
                       max_replicas=1),
    "pro": TierLimits(per_minute=100, per_day=10_000, per_month=100_000, concurrent=20,
                      max_replicas=10),
    "enterprise": TierLimits(per_minute=1_000, per_day=100_000, per_month=None, concurrent=200,
                             max_replicas=100, prepaid=False),
}  # fmt: skip
_FIELDS = (
    "per_minute", "per_day", "per_month", "concurrent", "max_replicas", "burst", "prepaid"
)  # fmt: skip


def parse_tier_limits(raw: str) -> dict[str, TierLimits]:
    """`KILN_TIER_LIMITS`: JSON of changes to the defaults, e.g. `{"free": {"per_minute": 20}}`."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object of tiers")
    tiers = dict(DEFAULT_TIERS)
    for tier, changes in data.items():
        if tier not in tiers:
            raise ValueError(f"unknown tier {tier!r}; tiers are {', '.join(DEFAULT_TIERS)}")
        tiers[tier] = with_overrides(tiers[tier], changes)
    return tiers


def with_overrides(limits: TierLimits, changes: Any) -> TierLimits:
    """`limits` with `changes` (a customer's `limit_overrides`) applied; refuses nonsense."""
    if not changes:
        return limits
    if not isinstance(changes, dict) or set(changes) - set(_FIELDS):
        raise ValueError(f"limits take {', '.join(_FIELDS)}, got {changes!r}")
    for name, value in changes.items():
        if name == "prepaid":
            if not isinstance(value, bool):
                raise ValueError(f"prepaid={value!r} is not valid: expected true or false")
            continue
        nullable = name in ("per_day", "per_month", "burst")
        ok = (value is None and nullable) or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 1
        )
        if not ok:
            allowed = "an integer >= 1" + (" or null (no limit)" if nullable else "")
            raise ValueError(f"{name}={value!r} is not valid: expected {allowed}")
    return replace(limits, **changes)

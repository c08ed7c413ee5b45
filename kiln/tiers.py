"""Customer tiers and their limits (standard library only: settings validate them).

Defaults per tier (issue 7), changed platform-wide by `KILN_TIER_LIMITS` and per customer by
its `limit_overrides`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["DEFAULT_TIERS", "ZERO_ALLOWED", "TierLimits", "parse_tier_limits", "with_overrides"]


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
    # Pods and shells at once (starting or running), and the GPUs they hold together. The
    # free tier's are these defaults: one pod with one GPU, enough to try a notebook on a GPU
    # as Modal's and RunPod's new accounts can, paid from the prepaid balance like any replica,
    # while more (and multi-GPU pods) wait for a paid tier, as their GPU quotas do.
    max_pods: int = 1
    max_pod_gpus: int = 1

    @property
    def burst_size(self) -> int:
        return self.burst if self.burst is not None else self.per_minute

    def describe(self) -> str:
        """`10/min, 1,000/day, 10,000/month, 2 at once, 1 replica, 1 pod with 1 GPU, prepaid`,
        for the docs."""
        parts = [f"{self.per_minute:,}/min"]
        if self.burst is not None:
            parts.append(f"bursts of {self.burst:,}")
        parts.append(f"{self.per_day:,}/day" if self.per_day is not None else "no daily cap")
        parts.append(
            f"{self.per_month:,}/month" if self.per_month is not None else "no monthly cap"
        )
        replicas = "replica" if self.max_replicas == 1 else "replicas"
        parts += [f"{self.concurrent:,} at once", f"{self.max_replicas:,} {replicas}"]
        pods = "pod" if self.max_pods == 1 else "pods"
        gpus = "GPU" if self.max_pod_gpus == 1 else "GPUs"
        parts.append(f"{self.max_pods:,} {pods} with {self.max_pod_gpus:,} {gpus}")
        parts.append("prepaid" if self.prepaid else "invoiced")
        return ", ".join(parts)


DEFAULT_TIERS: Mapping[str, TierLimits] = {
    "free": TierLimits(per_minute=10, per_day=1_000, per_month=10_000, concurrent=2,
                       max_replicas=1),
    # A team's pods: one 8-GPU node's worth.
    "pro": TierLimits(per_minute=100, per_day=10_000, per_month=100_000, concurrent=20,
                      max_replicas=10, max_pods=10, max_pod_gpus=8),
    "enterprise": TierLimits(per_minute=1_000, per_day=100_000, per_month=None, concurrent=200,
                             max_replicas=100, prepaid=False, max_pods=100, max_pod_gpus=64),
}  # fmt: skip
_FIELDS = (
    "per_minute", "per_day", "per_month", "concurrent", "max_replicas", "burst", "prepaid",
    "max_pods", "max_pod_gpus",
)  # fmt: skip
# Limits that may be 0 (none at all: a customer kept from pods, or from GPUs in them).
ZERO_ALLOWED = frozenset({"max_pods", "max_pod_gpus"})


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
        least = 0 if name in ZERO_ALLOWED else 1
        ok = (value is None and nullable) or (
            isinstance(value, int) and not isinstance(value, bool) and value >= least
        )
        if not ok:
            allowed = f"an integer >= {least}" + (" or null (no limit)" if nullable else "")
            raise ValueError(f"{name}={value!r} is not valid: expected {allowed}")
    return replace(limits, **changes)

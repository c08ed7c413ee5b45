"""How many replicas a function should have. Pure functions: the reconcile loop feeds them
observations and acts on their answers, and tests drive them with a fake clock."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ReplicaView", "desired_replicas", "idle_to_stop"]


def desired_replicas(
    *,
    pending: int,
    running: int,
    target_concurrency: int,
    buffer_replicas: int,
    min_replicas: int,
    max_replicas: int,
) -> int:
    """clamp(ceil((pending + running) / target_concurrency) + buffer_replicas, min, max),
    except that a function with no demand and no minimum keeps no buffer (scale to zero)."""
    demand = pending + running
    wanted = math.ceil(demand / max(1, target_concurrency))
    if demand > 0 or min_replicas > 0:
        wanted += buffer_replicas
    return max(min_replicas, min(max_replicas, wanted))


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    in_flight: int
    idle_since: float | None  # None while busy or still starting
    ready: bool


def idle_to_stop(
    replicas: list[ReplicaView], *, keep: int, idle_timeout_s: float, now: float
) -> list[str]:
    """Replicas to drain: idle for at least `idle_timeout_s`, longest idle first, never leaving
    fewer than `keep` replicas."""
    idle = sorted(
        (r for r in replicas if r.ready and r.in_flight == 0 and r.idle_since is not None
         and now - r.idle_since >= idle_timeout_s),
        key=lambda r: r.idle_since or 0.0,
    )  # fmt: skip
    surplus = max(0, len(replicas) - keep)
    return [r.replica_id for r in idle[:surplus]]

"""How many replicas a function should have. Pure functions: the reconcile loop feeds them
observations and acts on their answers, and tests drive them with a fake clock."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Plan", "ReplicaView", "Scaling", "desired_replicas", "idle_to_stop", "plan"]


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


@dataclass(frozen=True)
class Scaling:
    """A function's live scaling settings."""

    min_replicas: int
    max_replicas: int
    buffer_replicas: int
    target_concurrency: int
    idle_timeout_s: float


@dataclass(frozen=True)
class Plan:
    desired: int
    start: int  # replicas to start now
    drain: list[str]  # replicas to drain now (idle long enough, longest idle first)


def plan(scaling: Scaling, replicas: list[ReplicaView], *, pending: int, now: float) -> Plan:
    """One reconcile decision for one function: `replicas` are its current version's replicas
    that serve (starting or ready), `pending` the calls waiting in its queue, `now` the clock
    that `idle_since` is on. Used by the scheduler and by bench/autoscale_sim.py alike."""
    want = desired_replicas(
        pending=pending,
        running=sum(r.in_flight for r in replicas),
        target_concurrency=scaling.target_concurrency,
        buffer_replicas=scaling.buffer_replicas,
        min_replicas=scaling.min_replicas,
        max_replicas=scaling.max_replicas,
    )
    if want > len(replicas):
        return Plan(want, want - len(replicas), [])
    if want < len(replicas):
        stop = idle_to_stop(replicas, keep=want, idle_timeout_s=scaling.idle_timeout_s, now=now)
        return Plan(want, 0, stop)
    return Plan(want, 0, [])

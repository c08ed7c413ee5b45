"""The scaling decisions, driven with plain numbers and a fake clock."""

from __future__ import annotations

import pytest

from kiln.scheduler.policy import (
    Plan,
    ReplicaView,
    Scaling,
    desired_replicas,
    idle_to_stop,
    plan,
)


def want(**given: int) -> int:
    defaults = dict(pending=0, running=0, target_concurrency=1, buffer_replicas=0,
                    min_replicas=0, max_replicas=4)  # fmt: skip
    return desired_replicas(**{**defaults, **given})


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, 0),  # no demand: scale to zero
        ({"pending": 1}, 1),  # scale from zero
        ({"pending": 3, "running": 2}, 4),  # capped at max_replicas
        ({"pending": 9, "target_concurrency": 4}, 3),  # ceil(9 / 4)
        ({"running": 4, "target_concurrency": 4}, 1),
        ({"min_replicas": 2}, 2),  # never below the minimum
        ({"pending": 1, "buffer_replicas": 2}, 3),  # headroom under load
        ({"buffer_replicas": 2}, 0),  # but no buffer while idle at zero
        ({"min_replicas": 1, "buffer_replicas": 1}, 1),  # buffer is headroom above demand
        ({"pending": 50, "max_replicas": 10, "buffer_replicas": 3}, 10),
    ],
)
def test_desired_replicas(given: dict[str, int], expected: int) -> None:
    assert want(**given) == expected


def view(rid: str, idle_since: float | None, in_flight: int = 0, ready: bool = True) -> ReplicaView:
    return ReplicaView(rid, in_flight, idle_since, ready)


def test_only_replicas_idle_past_the_timeout_stop_longest_idle_first() -> None:
    replicas = [view("a", 100.0), view("b", 50.0), view("c", 190.0), view("d", None, 1)]
    assert idle_to_stop(replicas, keep=0, idle_timeout_s=60, now=200.0) == ["b", "a"]


def test_never_below_keep() -> None:
    replicas = [view("a", 0.0), view("b", 0.0), view("c", 0.0)]
    assert len(idle_to_stop(replicas, keep=2, idle_timeout_s=1, now=100.0)) == 1
    assert idle_to_stop(replicas, keep=3, idle_timeout_s=1, now=100.0) == []


def test_busy_or_starting_replicas_are_kept() -> None:
    replicas = [view("busy", 0.0, in_flight=2), view("starting", 0.0, ready=False)]
    assert idle_to_stop(replicas, keep=0, idle_timeout_s=1, now=100.0) == []


SCALING = Scaling(
    min_replicas=1, max_replicas=4, buffer_replicas=1, target_concurrency=2, idle_timeout_s=60
)


def views(*in_flight: int, idle_since: float | None = None) -> list[ReplicaView]:
    return [
        ReplicaView(f"r{i}", n, None if n else idle_since, ready=True)
        for i, n in enumerate(in_flight)
    ]


def test_a_burst_scales_up_to_max_and_no_further() -> None:
    decision = plan(SCALING, views(2), pending=50, now=0.0)
    assert (decision.desired, decision.start, decision.drain) == (4, 3, [])


def test_buffer_replicas_keep_headroom_under_load() -> None:
    # 3 calls need 2 replicas at target 2; the buffer asks for a third.
    decision = plan(SCALING, views(2, 1), pending=0, now=0.0)
    assert (decision.desired, decision.start) == (3, 1)


def test_idle_replicas_drain_after_the_timeout_and_never_below_min() -> None:
    idle = views(0, 0, 0, idle_since=100.0)
    assert plan(SCALING, idle, pending=0, now=159.0).drain == []  # not idle long enough
    decision = plan(SCALING, idle, pending=0, now=160.0)
    assert decision.desired == 1  # no demand: min_replicas, and no buffer without demand
    assert decision.drain == ["r0", "r1"]  # one stays


def test_a_function_at_zero_stays_there_until_demand() -> None:
    quiet = Scaling(0, 4, 1, 1, 60)
    assert plan(quiet, [], pending=0, now=0.0) == Plan(0, 0, [])
    assert plan(quiet, [], pending=1, now=0.0) == Plan(2, 2, [])  # the call and the buffer

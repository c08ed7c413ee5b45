"""The scaling decisions, driven with plain numbers and a fake clock."""

from __future__ import annotations

import pytest

from kiln.scheduler.policy import ReplicaView, desired_replicas, idle_to_stop


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

"""The node agent's meter (kiln.invoker.usage): a replica's time cut at fixed points from its
slot to its exit, nothing lost, nothing twice, calls counted from its heartbeats."""

from __future__ import annotations

import uuid

from kiln.invoker.usage import NodeMeter
from kiln.metering import missing_reports
from kiln.wire import StartReplica, Subjects, UsageReport

SINCE = 1_000_000.0


def launch() -> StartReplica:
    return StartReplica(
        replica_id=str(uuid.uuid4()), function_id=str(uuid.uuid4()), version_id="v",
        generation=1, app="a", function="f", artifact_digest="d", entrypoint="a.py", spec={},
        gpu_type="H100", gpu_count=1, received_at=SINCE, customer_id=str(uuid.uuid4()),
    )  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = SINCE

    def __call__(self) -> float:
        return self.now


def meter_at(clock: Clock) -> NodeMeter:
    return NodeMeter(nc=None, subjects=Subjects("t"), clock=clock)  # type: ignore[arg-type]


def spans(reports: list[UsageReport]) -> list[tuple[str, float, float, bool]]:
    return [(r.event_id.rsplit(":", 1)[1], round(r.period_start - SINCE, 6),
             round(r.period_end - SINCE, 6), r.final) for r in reports]  # fmt: skip


def test_time_is_cut_at_fixed_points_from_the_slot_and_ends_at_the_exit() -> None:
    clock = Clock()
    meter = meter_at(clock)
    start = launch()
    meter.start(start)
    clock.now = SINCE + 4.9
    meter.cut_due()
    assert meter.outbox == []  # the first interval has not ended
    clock.now = SINCE + 10.2
    meter.cut_due()
    meter.stopped(start.replica_id, SINCE + 12.5)
    assert spans(meter.outbox) == [("1", 0, 5, False), ("2", 5, 10, False), ("3", 10, 12.5, True)]
    meter.stopped(start.replica_id, SINCE + 20)  # closed once
    assert len(meter.outbox) == 3


def test_intervals_not_yet_cut_when_the_process_exits_are_all_written() -> None:
    # The agent was busy (or its loop late): the exit still yields every interval to it.
    meter = meter_at(Clock())
    start = launch()
    meter.start(start)
    meter.stopped(start.replica_id, SINCE + 13.25)
    assert spans(meter.outbox) == [("1", 0, 5, False), ("2", 5, 10, False), ("3", 10, 13.25, True)]


def test_the_same_intervals_as_a_scheduler_closing_a_lost_node_writes() -> None:
    # Whoever writes a report, it has the same id and bounds: copies collide in the ledger.
    clock = Clock()
    meter = meter_at(clock)
    start = launch()
    meter.start(start)
    clock.now = SINCE + 11
    meter.cut_due()
    meter.stopped(start.replica_id, SINCE + 11)
    assert spans(meter.outbox) == spans(missing_reports(start, SINCE + 11, seen=()))


def test_calls_are_counted_in_the_interval_in_which_its_heartbeat_said_so() -> None:
    clock = Clock()
    meter = meter_at(clock)
    start = launch()
    meter.start(start)
    meter.count_calls(start.replica_id, 1)
    clock.now = SINCE + 5
    meter.cut_due()
    meter.count_calls(start.replica_id, 3)
    meter.count_calls(start.replica_id, 2)  # an older beat, late: totals never go back
    clock.now = SINCE + 10
    meter.cut_due()
    meter.stopped(start.replica_id, SINCE + 10.5)
    assert [r.calls for r in meter.outbox] == [1, 2, 0]


def test_an_exit_on_a_cut_point_ends_the_interval_it_closes() -> None:
    meter = meter_at(Clock())
    start = launch()
    meter.start(start)
    meter.stopped(start.replica_id, SINCE + 10)
    assert spans(meter.outbox) == [("1", 0, 5, False), ("2", 5, 10, True)]
    assert spans(meter.outbox) == spans(missing_reports(start, SINCE + 10, seen=()))


def test_a_made_up_call_count_is_not_believed() -> None:
    meter = meter_at(Clock())
    start = launch()
    meter.start(start)
    meter.count_calls(start.replica_id, 3)
    meter.count_calls(start.replica_id, 2**40)  # past the ledger's column
    meter.stopped(start.replica_id, SINCE + 1)
    assert [r.calls for r in meter.outbox] == [3]

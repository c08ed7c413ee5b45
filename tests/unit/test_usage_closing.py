"""The cut points of replica usage and what a node agent writes for a replica that exited
(kiln.invoker.usage): fixed boundaries, nothing lost, nothing twice."""

from __future__ import annotations

import uuid

from kiln.invoker.usage import UsageCloser, UsageMeter
from kiln.metering import usage_report
from kiln.wire import StartReplica, Subjects

SINCE = 1_000_000.0


def launch() -> StartReplica:
    return StartReplica(
        replica_id=str(uuid.uuid4()), function_id=str(uuid.uuid4()), version_id="v",
        generation=1, app="a", function="f", artifact_digest="d", entrypoint="a.py", spec={},
        gpu_type="H100", gpu_count=1, received_at=SINCE, customer_id=str(uuid.uuid4()),
    )  # fmt: skip


def closer_watching(start: StartReplica, seen: list[tuple[int, float, float, bool]]) -> UsageCloser:
    """A node agent's closer that has heard the replica's reports `seen`."""
    closer = UsageCloser(nc=None, subjects=Subjects("t"))  # type: ignore[arg-type]
    closer.track(start)
    for seq, begin, end, final in seen:
        closer.saw(usage_report(start, seq, begin, end, final=final))
    return closer


def spans(reports: list) -> list[tuple[str, float, float, bool]]:  # type: ignore[type-arg]
    return [(r.event_id.rsplit(":", 1)[1], round(r.period_start - SINCE, 6),
             round(r.period_end - SINCE, 6), r.final) for r in reports]  # fmt: skip


def test_the_replica_cuts_its_time_at_fixed_points_and_ends_at_its_stop() -> None:
    meter = UsageMeter(nc=None, subjects=Subjects("t"), launch=launch())  # type: ignore[arg-type]
    meter.count_call()
    meter._cut(SINCE + 5)
    meter._cut(SINCE + 10)
    meter.count_call()
    meter.count_call()
    meter._cut(SINCE + 12.5, final=True)
    assert spans(meter.unsent) == [("1", 0, 5, False), ("2", 5, 10, False), ("3", 10, 12.5, True)]
    assert [r.calls for r in meter.unsent] == [1, 0, 2]


def test_a_killed_replica_gets_every_interval_it_did_not_report_up_to_its_exit() -> None:
    start = launch()
    closer = closer_watching(start, [(1, SINCE, SINCE + 5, False)])
    reports = closer.closing_reports(start.replica_id, SINCE + 13.25)
    # The last report it made once more (it may not have been stored), then the rest.
    assert spans(reports) == [
        ("1", 0, 5, False), ("2", 5, 10, False), ("3", 10, 13.25, True),
    ]  # fmt: skip
    assert start.replica_id not in closer.watched


def test_reports_the_agent_missed_are_sent_again_under_their_own_ids() -> None:
    start = launch()
    closer = closer_watching(start, [(2, SINCE + 5, SINCE + 10, False)])  # report 1 unseen
    assert spans(closer.closing_reports(start.replica_id, SINCE + 11)) == [
        ("2", 5, 10, False), ("1", 0, 5, False), ("3", 10, 11, True),
    ]  # fmt: skip


def test_after_a_clean_final_report_only_the_moments_to_the_exit_are_added() -> None:
    start = launch()
    closer = closer_watching(start, [(1, SINCE, SINCE + 5, False), (2, SINCE + 5, SINCE + 7, True)])
    assert spans(closer.closing_reports(start.replica_id, SINCE + 7.004)) == [
        ("2", 5, 7, True), ("3", 7, 7.004, True),
    ]  # fmt: skip


def test_a_replica_that_never_reported_is_billed_from_its_slot_to_its_exit() -> None:
    start = launch()
    closer = closer_watching(start, [])
    assert spans(closer.closing_reports(start.replica_id, SINCE + 0.8)) == [("1", 0, 0.8, True)]
    assert closer.closing_reports(start.replica_id, SINCE + 9) == []  # closed once

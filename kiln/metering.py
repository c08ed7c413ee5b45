"""The cut points of a replica's billable time, shared by the replica that reports it, the node
agent that closes it when the process exits, and the scheduler that closes it when a whole node
is lost. Standard library only.

Report `n` of a replica covers `[since + (n-1)·interval, since + n·interval]`, where `since` is
when its node agent gave it its slot; its event id is `<replica>:<n>`. Whoever writes a report,
it has the same id and bounds, so copies collide instead of being charged twice.
"""

from __future__ import annotations

import math
from collections.abc import Collection

from kiln.wire import StartReplica, UsageReport

__all__ = ["USAGE_INTERVAL_S", "missing_reports", "usage_report"]

USAGE_INTERVAL_S = 5.0


def usage_report(
    launch: StartReplica, seq: int, start: float, end: float, *, calls: int = 0, final: bool = False
) -> UsageReport:
    return UsageReport(
        event_id=f"{launch.replica_id}:{seq}",
        replica_id=launch.replica_id,
        customer_id=launch.customer_id,
        function_id=launch.function_id,
        gpu_type=launch.gpu_type,
        gpu_count=launch.gpu_count,
        period_start=start,
        period_end=end,
        final=final,
        calls=calls,
        since=launch.received_at,
    )


def missing_reports(
    launch: StartReplica,
    end: float,
    seen: Collection[int],
    interval_s: float = USAGE_INTERVAL_S,
) -> list[UsageReport]:
    """The reports of a replica whose time ended at `end` that are not in `seen`: every interval
    up to `end`, the last one cut short there."""
    since = launch.received_at
    last = max(1, math.ceil((end - since) / interval_s))
    reports = []
    for seq in range(1, last + 1):
        if seq in seen:
            continue
        start = since + (seq - 1) * interval_s
        stop = max(start, min(end, since + seq * interval_s))
        reports.append(usage_report(launch, seq, start, stop, final=seq == last))
    return reports

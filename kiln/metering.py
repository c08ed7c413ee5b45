"""The cut points of a replica's billable time, shared by the node agent that reports it and
closes it when the process exits, and the scheduler that has it closed here
(`close_lost_usage`) when a whole node is lost. Standard library only.

Report `n` of a replica covers `[since + (n-1)·interval, since + n·interval]`, where `since` is
when its node agent gave it its slot; its event id is `<replica>:<n>`. Whoever writes a report,
it has the same id and bounds, so copies collide instead of being charged twice.

Reports carry a MAC (`Kiln-Usage-Mac`) made with a key derived from the platform's signing key
(`KILN_SNAPSHOT_SIGNING_KEY`), which node agents, schedulers and billing workers hold and
replicas never do: JetStream can be made to publish a replica's bytes on any subject of the
account (docs/security.md), and the billing worker charges only what the platform wrote.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING

from kiln.wire import StartReplica, Subjects, UsageReport, encode

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

__all__ = [
    "USAGE_INTERVAL_S",
    "USAGE_MAC",
    "close_lost_usage",
    "missing_reports",
    "publish_usage",
    "usage_mac",
    "usage_report",
]

_log = logging.getLogger("kiln.metering")

USAGE_INTERVAL_S = 5.0
USAGE_MAC = "Kiln-Usage-Mac"
_PUBLISH_TIMEOUT_S = 2.0


def usage_mac(secret: str, body: bytes) -> str:
    """The MAC of a usage report's bytes, with a key of its own derived from `secret`."""
    key = hmac.new(secret.encode(), b"kiln usage report", hashlib.sha256).digest()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


async def publish_usage(
    nc: NATS, subjects: Subjects, report: UsageReport, *, secret: str | None
) -> None:
    """Into the usage stream, or raise; the message id makes a retry harmless. With `secret`
    (the platform's signing key) it carries the MAC the billing worker checks."""
    body = encode(report)
    headers = {"Nats-Msg-Id": report.event_id}
    if secret is not None:
        headers[USAGE_MAC] = usage_mac(secret, body)
    await nc.jetstream().publish(
        subjects.usage(uuid.UUID(report.replica_id)), body,
        timeout=_PUBLISH_TIMEOUT_S, headers=headers,
    )  # fmt: skip


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


async def close_lost_usage(
    nc: NATS,
    subjects: Subjects,
    launch: StartReplica | None,
    *,
    ended: float,
    charged: Callable[[str], Awaitable[Collection[int]]],
    secret: str | None,
) -> int:
    """A replica's node agent died with it, so nobody will report the rest of its time: write
    the intervals the ledger lacks (`charged(replica_id)`: the numbers it has) up to `ended`,
    the node's last heartbeat in epoch seconds. Copies of intervals the agent did report
    collide with them and count once. Returns how many it wrote.

    A replica whose billable start is unknown (`launch` None, or never taken by an agent: one
    adopted from an earlier scheduler) is left alone. A failure is logged, not raised: it loses
    at most the intervals since the agent's last report, and the caller goes on with the rest.
    """
    if launch is None or not launch.received_at:
        return 0
    written = 0
    try:
        for report in missing_reports(launch, ended, await charged(launch.replica_id)):
            await publish_usage(nc, subjects, report, secret=secret)
            written += 1
    except Exception as exc:  # noqa: BLE001 - at most the intervals since its last report
        _log.error("could not close the usage of lost replica %s: %s", launch.replica_id, exc)
    return written

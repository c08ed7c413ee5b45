"""A replica's billable time, reported as it runs: every few seconds and once more when it
releases its slot, each interval a `UsageReport` in the file-backed JetStream stream
`<ns>_usage`, published with its event id as the message id (and retried with it), so a report
is stored once however often it is sent. A replica that dies loses at most one interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from nats.aio.client import Client as NATS

from kiln.wire import StartReplica, Subjects, UsageReport, encode

__all__ = ["USAGE_INTERVAL_S", "UsageMeter"]

_log = logging.getLogger("kiln.replica")
USAGE_INTERVAL_S = 5.0
_TRIES = 5


class UsageMeter:
    def __init__(self, nc: NATS, subjects: Subjects, launch: StartReplica) -> None:
        self.nc = nc
        self.subjects = subjects
        self.launch = launch
        # Billable from when the node agent gave it its slot.
        self.since = launch.received_at or time.time()
        self.seq = 0

    async def run(self) -> None:
        """Report every interval until cancelled."""
        while True:
            await asyncio.sleep(USAGE_INTERVAL_S)
            await self.report()

    async def report(self, *, final: bool = False) -> None:
        now = time.time()
        self.seq += 1
        report = UsageReport(
            event_id=f"{self.launch.replica_id}:{self.seq}",
            replica_id=self.launch.replica_id,
            customer_id=self.launch.customer_id,
            function_id=self.launch.function_id,
            gpu_type=self.launch.gpu_type,
            gpu_count=self.launch.gpu_count,
            period_start=self.since,
            period_end=now,
            final=final,
        )
        self.since = now
        subject = self.subjects.usage(uuid.UUID(self.launch.replica_id))
        headers = {"Nats-Msg-Id": report.event_id}
        for attempt in range(_TRIES):
            try:
                await self.nc.jetstream().publish(subject, encode(report), headers=headers)
                return
            except Exception as exc:  # noqa: BLE001 - retried with the same id: stored once
                if attempt == _TRIES - 1:
                    _log.error("usage report %s could not be sent: %s", report.event_id, exc)
                    return
                await asyncio.sleep(0.2 * (attempt + 1))

"""Replicas' billable time, measured by their node agent: the trusted side, which gives a
replica its slot, starts its process and sees it exit. The replica reports nothing that bills
it (its NATS credentials cannot even reach the usage stream).

A replica's time is cut into intervals at fixed points: report `n` covers
`[since + (n-1)·interval, since + n·interval]`, where `since` is when the agent gave it its
slot; the last report ends when the process exited. Each report is a `UsageReport` in the
file-backed JetStream stream `<ns>_usage`, published with its event id (`replica:n`) as the
message id and retried with it, in order, until JetStream has it: stored once however often it
is sent.

The calls a report counts are the replica's own word (the running total in its heartbeats):
they are shown in usage reports, never priced.

If the agent itself dies, its replicas die with it (parent-death signal); the scheduler, when it
declares the node lost, writes the intervals the ledger lacks up to the node's last heartbeat
(kiln.metering.missing_reports), with the same ids, so nothing is charged twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS

from kiln._trouble import Trouble
from kiln.metering import USAGE_INTERVAL_S, publish_usage, usage_report
from kiln.wire import StartReplica, Subjects, UsageReport

__all__ = ["NodeMeter"]

_log = logging.getLogger("kiln.usage")
_RETRY_S = 1.0
_MAX_CALLS = 2**31 - 1  # the ledger's column


@dataclass
class _Metered:
    launch: StartReplica
    seq: int = 0  # reports cut
    calls: int = 0  # the replica's running total, from its heartbeats
    billed_calls: int = 0  # the total at the last cut

    @property
    def since(self) -> float:
        return self.launch.received_at

    def next_cut(self, interval_s: float) -> float:
        return self.since + (self.seq + 1) * interval_s


class NodeMeter:
    """Every replica of the node, metered from the moment it got its slot until its process
    exited."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        *,
        secret: str | None = None,
        interval_s: float = USAGE_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`secret`: the platform's signing key, for the reports' MAC (kiln.metering)."""
        self.nc = nc
        self.secret = secret
        self.subjects = subjects
        self.interval_s = interval_s
        self.clock = clock
        self.metered: dict[str, _Metered] = {}
        self.outbox: list[UsageReport] = []
        self._trouble = Trouble(_log, "sending usage reports (kept until the stream takes them)")
        self._wake = asyncio.Event()

    def start(self, launch: StartReplica) -> None:
        """The replica holds its slot since `launch.received_at`."""
        self.metered[launch.replica_id] = _Metered(launch)
        self._wake.set()

    def count_calls(self, replica_id: str, total: int) -> None:
        """The calls the replica says it has taken so far (its word: bounded, so that a
        made-up count cannot overflow the ledger's column and hold up everyone's usage)."""
        metered = self.metered.get(replica_id)
        if metered is not None and metered.calls < total <= _MAX_CALLS:
            metered.calls = total

    def stopped(self, replica_id: str, at: float) -> None:
        """Its process exited at `at`: the intervals up to then, the last cut short there."""
        metered = self.metered.pop(replica_id, None)
        if metered is None:
            return
        # An exit on a cut point ends the interval it closes (as kiln.metering writes it).
        while metered.next_cut(self.interval_s) < at:
            start = metered.since + metered.seq * self.interval_s
            self._cut(metered, start, start + self.interval_s)
        start = metered.since + metered.seq * self.interval_s
        self._cut(metered, start, max(start, at), final=True)
        self._wake.set()

    def cut_due(self) -> None:
        """Cut every interval that has ended by now."""
        now = self.clock()
        for metered in self.metered.values():
            self._cut_until(metered, now)

    def _cut_until(self, metered: _Metered, end: float) -> None:
        while metered.next_cut(self.interval_s) <= end:
            start = metered.since + metered.seq * self.interval_s
            self._cut(metered, start, start + self.interval_s)

    def _cut(self, metered: _Metered, start: float, end: float, *, final: bool = False) -> None:
        metered.seq += 1
        calls, metered.billed_calls = metered.calls - metered.billed_calls, metered.calls
        self.outbox.append(
            usage_report(metered.launch, metered.seq, start, end, calls=calls, final=final)
        )

    def _next_due_s(self) -> float:
        if not self.metered:
            return 3600.0
        due = min(m.next_cut(self.interval_s) for m in self.metered.values())
        return max(0.0, due - self.clock())

    async def run(self) -> None:
        """Cut intervals as they end and publish the reports in order, retrying while NATS is
        away, until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._next_due_s())
            self._wake.clear()
            self.cut_due()
            while self.outbox:
                if not await self._send_one():
                    await asyncio.sleep(_RETRY_S)
                    self.cut_due()

    async def _send_one(self) -> bool:
        try:
            await publish_usage(self.nc, self.subjects, self.outbox[0], secret=self.secret)
        except Exception as exc:  # noqa: BLE001 - NATS trouble: kept until NATS takes it
            self._trouble.failed(exc)
            return False
        self._trouble.ok()
        self.outbox.pop(0)
        return True

    async def drain(self, within_s: float) -> None:
        """At the agent's stop (its replicas stopped): a last chance for the queued reports."""
        deadline = time.monotonic() + within_s
        while self.outbox and time.monotonic() < deadline and not self.nc.is_closed:
            if not await self._send_one():
                await asyncio.sleep(0.5)
        if self.outbox:
            _log.error("%d usage reports lost at agent stop", len(self.outbox))

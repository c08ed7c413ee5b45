"""A replica's billable time, reported as it runs, and closed by its node agent when it ends.

A replica's time is cut into intervals at fixed points: report `n` covers
`[since + (n-1)·interval, since + n·interval]`, where `since` is when the node agent gave it its
slot; the last report ends when the replica lets go. Each report is a `UsageReport` in the
file-backed JetStream stream `<ns>_usage`, published with its event id (`replica:n`) as the
message id and retried with it, in order, until JetStream has it: stored once however often it
is sent.

Because the cut points are fixed, the node agent can write any report the replica did not: it
listens to its replicas' reports, and when a process exits it publishes the reports it never
saw up to the exit (the interval the replica was in when it was killed included), the last one
it saw once more (it may not have been stored), and after a clean final report the few
milliseconds to the exit. Replays collide on the event id, so a crash costs the customer
neither a lost interval nor a double charge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from kiln.metering import USAGE_INTERVAL_S, missing_reports, usage_report
from kiln.wire import StartReplica, Subjects, UsageReport, decode, encode

__all__ = ["UsageCloser", "UsageMeter", "publish_usage"]

_log = logging.getLogger("kiln.usage")
_PUBLISH_TIMEOUT_S = 2.0


async def publish_usage(nc: NATS, subjects: Subjects, report: UsageReport) -> None:
    """Into the stream, or raise; the message id makes a retry harmless."""
    await nc.jetstream().publish(
        subjects.usage(uuid.UUID(report.replica_id)),
        encode(report),
        timeout=_PUBLISH_TIMEOUT_S,
        headers={"Nats-Msg-Id": report.event_id},
    )


class UsageMeter:
    """The replica's side: a report at every cut point and a final one at stop."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        launch: StartReplica,
        interval_s: float = USAGE_INTERVAL_S,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.launch = launch
        self.interval_s = interval_s
        # Billable from when the node agent gave it its slot.
        self.since = launch.received_at or time.time()
        self.seq = 0  # reports made
        self.calls = 0  # calls taken since the last report
        self.unsent: list[UsageReport] = []

    def count_call(self) -> None:
        self.calls += 1

    def _cut(self, end: float, *, final: bool = False) -> None:
        start = self.since + self.seq * self.interval_s
        self.seq += 1
        self.unsent.append(
            usage_report(self.launch, self.seq, start, end, calls=self.calls, final=final)
        )
        self.calls = 0

    async def run(self) -> None:
        """Report at every cut point until cancelled; what NATS refuses goes again next time."""
        while True:
            due = self.since + (self.seq + 1) * self.interval_s
            await asyncio.sleep(max(0.0, due - time.time()))
            self._cut(due)
            await self.flush()

    async def stop(self, *, within_s: float = 10.0) -> None:
        """The last interval, up to now (the slot's release), and whatever is still unsent."""
        self._cut(max(time.time(), self.since + self.seq * self.interval_s), final=True)
        deadline = time.monotonic() + within_s
        while self.unsent and time.monotonic() < deadline:
            if not await self.flush():
                await asyncio.sleep(0.5)
        if self.unsent:  # the node agent publishes them for us when we exit
            _log.warning("%d usage reports unsent at exit", len(self.unsent))

    async def flush(self) -> bool:
        """Send the unsent reports in order; whether all went. In order, so that the node
        agent, having seen report n, knows every earlier one is stored."""
        while self.unsent:
            try:
                await publish_usage(self.nc, self.subjects, self.unsent[0])
            except Exception as exc:  # noqa: BLE001 - NATS trouble: kept for the next try
                _log.warning("usage report %s not sent yet: %s", self.unsent[0].event_id, exc)
                return False
            self.unsent.pop(0)
        return True


@dataclass
class _Seen:
    launch: StartReplica
    seen: set[int] = field(default_factory=set)
    last: UsageReport | None = None  # the highest-numbered report seen
    subscription: Subscription | None = None


def _quiet(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: an unsubscribe on a closed connection is no news


class UsageCloser:
    """The node agent's side: it watches each replica's reports and closes its time when the
    process exits, retrying until JetStream has the closing reports (or the agent stops)."""

    def __init__(self, nc: NATS, subjects: Subjects, interval_s: float = USAGE_INTERVAL_S) -> None:
        self.nc = nc
        self.subjects = subjects
        self.interval_s = interval_s
        self.watched: dict[str, _Seen] = {}
        self.outbox: list[UsageReport] = []
        self._wake = asyncio.Event()

    def track(self, launch: StartReplica) -> _Seen:
        seen = self.watched[launch.replica_id] = _Seen(launch)
        return seen

    def saw(self, report: UsageReport) -> None:
        """A report a replica published (the node agent hears them all)."""
        seen = self.watched.get(report.replica_id)
        if seen is None:
            return
        seq = int(report.event_id.rpartition(":")[2])
        seen.seen.add(seq)
        if seen.last is None or seq >= int(seen.last.event_id.rpartition(":")[2]):
            seen.last = report

    async def watch(self, launch: StartReplica) -> None:
        seen = self.track(launch)

        async def on_report(msg: Msg) -> None:
            with contextlib.suppress(ValueError, TypeError):
                self.saw(decode(UsageReport, msg.data))

        with contextlib.suppress(Exception):  # without NATS it closes from the start
            seen.subscription = await self.nc.subscribe(
                self.subjects.usage(uuid.UUID(launch.replica_id)), cb=on_report
            )

    def closing_reports(self, replica_id: str, exited_at: float) -> list[UsageReport]:
        """What the platform may lack of the replica's time once it exited at `exited_at`."""
        seen = self.watched.pop(replica_id, None)
        if seen is None:
            return []
        if seen.subscription is not None:
            task = asyncio.ensure_future(seen.subscription.unsubscribe())
            task.add_done_callback(_quiet)
        reports = [] if seen.last is None else [seen.last]
        if seen.last is not None and seen.last.final:
            seq = int(seen.last.event_id.rpartition(":")[2])
            if exited_at > seen.last.period_end:
                reports.append(
                    usage_report(seen.launch, seq + 1, seen.last.period_end, exited_at, final=True)
                )
            return reports
        # Killed (or its final report unseen): every interval up to the exit it did not report.
        return reports + missing_reports(seen.launch, exited_at, seen.seen, self.interval_s)

    def closed(self, replica_id: str, exited_at: float) -> None:
        """The replica's process exited: queue its closing reports."""
        self.outbox.extend(self.closing_reports(replica_id, exited_at))
        self._wake.set()

    async def run(self) -> None:
        """Publish the queued closing reports, retrying while NATS is away, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.outbox:
                try:
                    await publish_usage(self.nc, self.subjects, self.outbox[0])
                except Exception as exc:  # noqa: BLE001 - kept until NATS takes it
                    _log.warning("closing usage report not sent yet: %s", exc)
                    await asyncio.sleep(1.0)
                    continue
                self.outbox.pop(0)

    async def drain(self, within_s: float) -> None:
        """At the agent's stop: a last chance for the queued reports."""
        deadline = time.monotonic() + within_s
        while self.outbox and time.monotonic() < deadline and not self.nc.is_closed:
            try:
                await publish_usage(self.nc, self.subjects, self.outbox[0])
                self.outbox.pop(0)
            except Exception:  # noqa: BLE001
                await asyncio.sleep(0.5)
        if self.outbox:
            _log.error("%d closing usage reports lost at agent stop", len(self.outbox))

"""The billing worker: replicas' usage reports from the JetStream stream `<ns>_usage` into the
PostgreSQL ledger, acked only after the transaction commits. Each report is charged by
`kiln.billing.ledger.charge_usage`: a `usage_events` row (its id is the replica id and sequence
number: a report delivered twice hits the primary key and is charged once), a `usage` ledger
entry at the price of the replica's GPU type, the day's spend, a meter event for Stripe and,
where the balance crossed the refill threshold, a refill.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import sqlalchemy as sa
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import FetchTimeoutError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kiln._tasks import cancel_and_wait
from kiln._trouble import Trouble
from kiln.billing.ledger import (
    BLOCK_BALANCE,
    BLOCK_INVOICE,
    BLOCK_SPEND_CAP,
    BillingRules,
    Changes,
    charge_usage,
    refresh_block,
)
from kiln.billing.plans import charge_due_fees
from kiln.billing.storage import charge_storage
from kiln.db.models import Customer
from kiln.db.session import transaction
from kiln.metering import USAGE_MAC, usage_mac
from kiln.observability.billing import BillingMetrics
from kiln.seal import Seals
from kiln.streams import USAGE, USAGE_BILLING, ensure_consumer, ensure_stream
from kiln.wire import Subjects, UsageReport, decode

__all__ = ["BillingWorker", "announce_blocks"]

_log = logging.getLogger("kiln.billing")
# A sweep's charge: one batch in the caller's transaction; how many it charged.
_Charge = Callable[[AsyncSession, datetime, BillingRules, Changes], Awaitable[int]]
_BATCH = 256
_SWEEP_S = 30.0


class BillingWorker:
    def __init__(
        self,
        nc: NATS,
        sessions: async_sessionmaker[AsyncSession],
        namespace: str,
        rules: BillingRules,
        metrics: BillingMetrics | None = None,
        *,
        usage_secret: str | None = None,
        stream_replicas: int,
    ) -> None:
        """`usage_secret`: the platform's signing key; with it, only reports that carry its MAC
        are charged (kiln.metering). `stream_replicas`: `KILN_STREAM_REPLICAS`."""
        self.usage_secret = usage_secret
        self.stream_replicas = stream_replicas
        self.seals = Seals(usage_secret)
        self.metrics = metrics or BillingMetrics()
        self.nc = nc
        self.js = nc.jetstream()
        self.sessions = sessions
        self.subjects = Subjects(namespace)
        self.rules = rules

    async def run(self, stop: asyncio.Event) -> None:
        ns = self.subjects.ns
        await ensure_stream(self.js, USAGE, ns, replicas=self.stream_replicas)
        durable = await ensure_consumer(self.js, USAGE_BILLING, ns)
        sub = await self.js.pull_subscribe_bind(durable, stream=self.subjects.usage_stream)
        consume = asyncio.create_task(self._consume(sub), name="kiln-billing")
        sweep = asyncio.create_task(self._sweep(), name="kiln-billing-blocks")
        try:
            await stop.wait()
        finally:
            await cancel_and_wait(consume, sweep)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _sweep(self) -> None:
        while True:
            try:
                await self.charge_fees()
            except Exception:  # noqa: BLE001 - tried again at the next sweep
                _log.exception("charging plan fees failed")
            try:
                await self.charge_storage()
            except Exception:  # noqa: BLE001 - tried again at the next sweep
                _log.exception("charging pods' volume storage failed")
            try:
                await self.sweep_blocks()
            except Exception:  # noqa: BLE001 - tried again at the next sweep
                _log.exception("sweeping billing blocks failed")
            await asyncio.sleep(_SWEEP_S)

    async def charge_fees(self, now: datetime | None = None) -> int:
        """Charge the current period's plan fees that are due (a batch at a time); how many."""
        return await self._in_batches(charge_due_fees, now or datetime.now(UTC))

    async def charge_storage(self, now: datetime | None = None) -> int:
        """Charge pods' volume storage that is due (kiln.billing.storage); how many volumes."""
        return await self._in_batches(charge_storage, now or datetime.now(UTC))

    async def _in_batches(self, charge: _Charge, now: datetime) -> int:
        """`charge` a batch per transaction, announcing the blocks each changed, until one
        charges nothing; how many in all."""
        total = 0
        while True:
            changes = Changes()
            async with transaction(self.sessions) as session:
                charged = await charge(session, now, self.rules, changes)
            await announce_blocks(self.nc, self.subjects, changes, seals=self.seals)
            total += charged
            if charged == 0:
                return total

    async def _consume(self, sub: JetStreamContext.PullSubscription) -> None:
        trouble = Trouble(_log, "fetching usage reports")
        while True:
            try:
                messages = await sub.fetch(_BATCH, timeout=1.0)
                trouble.ok()
            except (TimeoutError, FetchTimeoutError):
                continue  # nothing to bill (or NATS is away: only a fetch that works says)
            except Exception as exc:  # noqa: BLE001 - NATS trouble: try again, never stop billing
                trouble.failed(exc)
                await asyncio.sleep(1.0)
                continue
            reports = []
            for msg in messages:
                if not self._from_the_platform(msg):
                    _log.error("dropping a usage report without a valid MAC on %s", msg.subject)
                    self.metrics.usage_reports.labels("refused").inc()
                    continue
                try:
                    reports.append(decode(UsageReport, msg.data))
                except (ValueError, TypeError):
                    _log.error("dropping an unreadable usage report")
                    await msg.term()
            try:
                await self.record(reports)
            except Exception:  # noqa: BLE001 - not acked: JetStream delivers them again
                _log.exception("recording %d usage reports failed; they come again", len(reports))
                await asyncio.sleep(1.0)
                continue
            for msg in messages:
                with contextlib.suppress(Exception):  # a lost ack: charged once all the same
                    await msg.ack()

    def _from_the_platform(self, msg: Msg) -> bool:
        if self.usage_secret is None:
            return True
        mac = (msg.headers or {}).get(USAGE_MAC, "")
        return hmac.compare_digest(mac, usage_mac(self.usage_secret, msg.data))

    async def record(self, reports: list[UsageReport]) -> int:
        """Write the reports down in one transaction; how many were new. Blocks the charges
        set or lifted are announced after the commit."""
        changes = Changes()
        refused = 0
        async with transaction(self.sessions) as session:
            for report in reports:
                if not _billable(report):
                    refused += 1
                    continue
                try:
                    async with session.begin_nested():  # one bad report spoils no other
                        await charge_usage(session, report, self.rules, changes)
                except IntegrityError as exc:
                    refused += 1
                    _log.error("usage report %s refused by the ledger: %s", report.event_id, exc)
        await announce_blocks(self.nc, self.subjects, changes, seals=self.seals)
        self.metrics.usage_reports.labels("charged").inc(changes.charged)
        self.metrics.usage_reports.labels("duplicate").inc(len(reports) - changes.charged - refused)
        self.metrics.usage_reports.labels("refused").inc(refused)
        for (tier, gpu), (ms, micros) in changes.usage.items():
            self.metrics.replica_seconds.labels(tier, gpu).inc(ms / 1000)
            self.metrics.charged.labels(tier, gpu).inc(micros)
        if reports:
            newest = max(report.period_end for report in reports)
            self.metrics.ledger_lag.set(max(0.0, time.time() - newest))
        return changes.charged

    async def sweep_blocks(self) -> None:
        """Lift spend-cap blocks whose day is over (nothing else would: no usage comes from a
        customer whose replicas are gone), and count the blocks for the metrics."""
        changes = Changes()
        async with transaction(self.sessions) as session:
            blocked = await session.scalars(
                sa.select(Customer.id).where(Customer.billing_block == BLOCK_SPEND_CAP)
            )
            for customer_id in list(blocked):
                await refresh_block(session, customer_id, self.rules, changes)
            rows = await session.execute(
                sa.select(Customer.billing_block, sa.func.count())
                .where(Customer.billing_block.is_not(None))
                .group_by(Customer.billing_block)
            )
            counts = {str(reason): int(count) for reason, count in rows}
        for reason in (BLOCK_BALANCE, BLOCK_SPEND_CAP, BLOCK_INVOICE):
            self.metrics.blocked_customers.labels(reason).set(counts.get(reason, 0))
        await announce_blocks(self.nc, self.subjects, changes, seals=self.seals)


def _billable(report: UsageReport) -> bool:
    try:
        uuid.UUID(report.customer_id)
        uuid.UUID(report.replica_id)
        uuid.UUID(report.function_id)
    except ValueError:
        _log.error("usage report %s names no customer; not billable", report.event_id)
        return False
    return True


async def announce_blocks(nc: NATS, subjects: Subjects, changes: Changes, *, seals: Seals) -> None:
    """Tell routers whose calls are blocked or allowed again, under the platform's seal (they
    also reread the blocks from PostgreSQL every few seconds, so a lost message only delays)."""
    for customer_id, block in changes.blocks.items():
        _log.info("customer %s billing block: %s", customer_id, block or "lifted")
        body = json.dumps({"customer_id": str(customer_id), "block": block}).encode()
        with contextlib.suppress(Exception):
            await nc.publish(
                subjects.billing_blocks, body, headers=seals.platform(subjects.billing_blocks, body)
            )

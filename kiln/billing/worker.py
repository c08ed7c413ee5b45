"""The billing worker: replicas' usage reports from the JetStream stream `<ns>_usage` into the
PostgreSQL ledger, acked only after the transaction commits. Each report becomes a
`usage_events` row (its id is the replica id and sequence number: a report delivered twice hits
the primary key and is charged once) and a `usage` ledger entry that debits the customer's
balance at the price of the replica's GPU type.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime

import sqlalchemy as sa
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import FetchTimeoutError
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kiln.billing.prices import cost_micros
from kiln.db.enums import LedgerKind
from kiln.db.models import Customer, LedgerEntry, UsageEvent
from kiln.db.session import transaction
from kiln.wire import Subjects, UsageReport, decode

__all__ = ["BillingWorker", "ensure_usage_stream"]

_log = logging.getLogger("kiln.billing")
_DURABLE = "billing"
_BATCH = 256


async def ensure_usage_stream(js: JetStreamContext, subjects: Subjects) -> None:
    config = StreamConfig(
        name=subjects.usage_stream,
        subjects=[subjects.all_usage],
        retention=RetentionPolicy.WORK_QUEUE,  # a report leaves once it is in the ledger
        storage=StorageType.FILE,
        duplicate_window=300,  # a replica's retries of one report are stored once
    )
    try:
        await js.add_stream(config)
    except Exception:  # noqa: BLE001 - exists already: bring its settings up to date
        await js.update_stream(config)


class BillingWorker:
    def __init__(
        self,
        nc: NATS,
        sessions: async_sessionmaker[AsyncSession],
        namespace: str,
        prices: Mapping[str, int],
    ) -> None:
        self.js = nc.jetstream()
        self.sessions = sessions
        self.subjects = Subjects(namespace)
        self.prices = prices

    async def run(self, stop: asyncio.Event) -> None:
        await ensure_usage_stream(self.js, self.subjects)
        sub = await self.js.pull_subscribe(
            self.subjects.all_usage,
            durable=_DURABLE,
            stream=self.subjects.usage_stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=30),
        )
        consume = asyncio.create_task(self._consume(sub), name="kiln-billing")
        try:
            await stop.wait()
        finally:
            consume.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consume
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _consume(self, sub: JetStreamContext.PullSubscription) -> None:
        while True:
            try:
                messages = await sub.fetch(_BATCH, timeout=1.0)
            except (TimeoutError, FetchTimeoutError):
                continue
            except Exception:  # noqa: BLE001 - NATS trouble: try again, never stop billing
                _log.exception("fetching usage reports failed; retrying")
                await asyncio.sleep(1.0)
                continue
            reports = []
            for msg in messages:
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

    async def record(self, reports: list[UsageReport]) -> int:
        """Write the reports down in one transaction; how many were new."""
        new = 0
        async with transaction(self.sessions) as session:
            for report in reports:
                try:
                    async with session.begin_nested():  # one bad report spoils no other
                        if await self._charge(session, report):
                            new += 1
                except IntegrityError as exc:
                    _log.error("usage report %s refused by the ledger: %s", report.event_id, exc)
        return new

    async def _charge(self, session: AsyncSession, report: UsageReport) -> bool:
        try:
            customer_id = uuid.UUID(report.customer_id)
            replica_id = uuid.UUID(report.replica_id)
            function_id = uuid.UUID(report.function_id)
        except ValueError:
            _log.error("usage report %s names no customer; not billable", report.event_id)
            return False
        start = datetime.fromtimestamp(report.period_start, UTC)
        end = datetime.fromtimestamp(max(report.period_start, report.period_end), UTC)
        duration_ms = int((end - start).total_seconds() * 1000)
        inserted = await session.scalar(
            insert(UsageEvent)
            .values(
                id=report.event_id,
                replica_id=replica_id,
                customer_id=customer_id,
                function_id=function_id,
                gpu_type=None if report.gpu_type == "none" else report.gpu_type,
                gpu_count=report.gpu_count,
                period_start=start,
                period_end=end,
                duration_ms=duration_ms,
            )
            .on_conflict_do_nothing(index_elements=[UsageEvent.id])
            .returning(UsageEvent.id)
        )
        if inserted is None:
            return False  # charged before
        cost = cost_micros(self.prices, report.gpu_type, report.gpu_count, duration_ms)
        balance = await session.scalar(
            sa.update(Customer)
            .where(Customer.id == customer_id)
            .values(balance_micros=Customer.balance_micros - cost)
            .returning(Customer.balance_micros)
        )
        session.add(
            LedgerEntry(
                customer_id=customer_id,
                kind=LedgerKind.USAGE,
                amount_micros=-cost,
                balance_after_micros=balance,
                usage_event_id=report.event_id,
                description=f"{duration_ms} ms of {report.gpu_count}x {report.gpu_type}",
            )
        )
        await session.flush()
        return True

"""The invocation log writer against a real PostgreSQL: batches by size and by time, keeps and
retries rows while the database is unreachable, bounds its memory and counts what it drops,
writes what is queued at shutdown, and deletes rows past the retention."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import sqlalchemy as sa
from eventually import eventually
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from kiln.db import migrate
from kiln.db.enums import InvocationKind, InvocationStatus
from kiln.db.models import Invocation
from kiln.db.session import create_engine
from kiln.observability.invocation_log import CallRecord, InvocationLog, InvocationLogMetrics
from kiln.settings import Settings

pytestmark = pytest.mark.integration

DAY_S = 86_400.0


@pytest.fixture(scope="module")
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    await asyncio.to_thread(migrate.upgrade, settings)
    built = create_engine(settings, application_name="kiln-test-invocations")
    yield built
    await built.dispose()


def record(function_id: uuid.UUID, *, started_at: float | None = None, n: int = 0) -> CallRecord:
    return CallRecord(
        customer_id=uuid.uuid4(),
        function_id=function_id,
        version_id=None,
        kind=InvocationKind.SYNC,
        status=InvocationStatus.SUCCEEDED,
        started_at=time.time() if started_at is None else started_at,
        duration_s=0.002,
        call_id=f"router-{n:x}",
        request_id=f"req_{n}",
        replica_id=str(uuid.uuid4()),
        queue_wait_s=0.0005,
        execution_s=0.001,
        bytes_in=10,
        bytes_out=20,
    )


async def rows_of(engine: AsyncEngine, function_id: uuid.UUID) -> int:
    async with engine.connect() as conn:
        count = await conn.scalar(
            sa.select(sa.func.count()).where(Invocation.function_id == function_id)
        )
    return int(count or 0)


def sample(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(name)
    return 0.0 if value is None else value


def writer(
    engine: AsyncEngine,
    *,
    retention_s: float = DAY_S,
    flush_every_s: float = 5.0,
    max_pending: int = 20_000,
) -> tuple[InvocationLog, CollectorRegistry]:
    registry = CollectorRegistry()
    log = InvocationLog(
        engine, InvocationLogMetrics(registry), retention_s=retention_s,
        flush_every_s=flush_every_s, max_pending=max_pending,
    )  # fmt: skip
    return log, registry


def has_rows(
    engine: AsyncEngine, function_id: uuid.UUID, count: int
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await rows_of(engine, function_id) == count

    return check


def counted(
    registry: CollectorRegistry, name: str, at_least: float
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return sample(registry, name) >= at_least

    return check


async def test_a_full_batch_is_written_at_once_and_a_small_one_on_the_timer(
    engine: AsyncEngine,
) -> None:
    function_id = uuid.uuid4()
    log, registry = writer(engine, flush_every_s=1.0)
    log.start()
    try:
        for n in range(100):
            log.record(record(function_id, n=n))
        # 100 rows: written without waiting for the timer.
        started = time.monotonic()
        await eventually(has_rows(engine, function_id, 100), within_s=0.9)
        assert time.monotonic() - started < 0.9
        log.record(record(function_id, n=100))
        await asyncio.sleep(0.3)  # the time under test: less than the timer's
        assert await rows_of(engine, function_id) == 100  # a lone row waits for the timer
        await eventually(has_rows(engine, function_id, 101), within_s=2.0)
    finally:
        await log.close()
    assert sample(registry, "kiln_invocation_log_rows_written_total") == 101
    assert sample(registry, "kiln_invocation_log_rows_dropped_total") == 0
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.select(*Invocation.__table__.c).where(
                    Invocation.function_id == function_id, Invocation.call_id == "router-7"
                )
            )
        ).one()
    assert (row.request_id, row.kind, row.status) == ("req_7", "sync", "succeeded")
    assert (row.queue_wait_ms, row.execution_ms, row.duration_ms) == (0, 1, 2)
    assert (row.bytes_in, row.bytes_out, row.cold_start) == (10, 20, False)


async def test_rows_wait_out_a_database_outage_and_the_queue_stays_bounded(
    engine: AsyncEngine,
) -> None:
    function_id = uuid.uuid4()
    unreachable = create_async_engine(
        "postgresql+asyncpg://kiln@127.0.0.1:1/kiln", connect_args={"timeout": 1}
    )
    log, registry = writer(unreachable, flush_every_s=0.2, max_pending=150)
    log.start()
    try:
        for n in range(160):
            log.record(record(function_id, n=n))
        await eventually(
            counted(registry, "kiln_invocation_log_write_failures_total", 2), within_s=5
        )
        assert log.pending == 150  # nothing lost while it retries, and no more than the bound
        assert sample(registry, "kiln_invocation_log_rows_dropped_total") == 10
        log.engine = engine  # the database is back
        await eventually(has_rows(engine, function_id, 150), within_s=10)
    finally:
        await log.close()
        await unreachable.dispose()
    assert sample(registry, "kiln_invocation_log_rows_written_total") == 150


async def test_what_is_queued_at_shutdown_is_written(engine: AsyncEngine) -> None:
    function_id = uuid.uuid4()
    log, registry = writer(engine, flush_every_s=60.0)
    log.start()
    for n in range(30):
        log.record(record(function_id, n=n))
    await log.close()
    assert await rows_of(engine, function_id) == 30
    assert sample(registry, "kiln_invocation_log_rows_dropped_total") == 0


async def test_rows_past_the_retention_are_deleted_and_newer_ones_kept(
    engine: AsyncEngine,
) -> None:
    function_id = uuid.uuid4()
    log, registry = writer(engine, retention_s=DAY_S)
    now = time.time()
    for n, age_days in enumerate((40, 2, 1.5, 0.5, 0)):
        log.record(record(function_id, started_at=now - age_days * DAY_S, n=n))
    await log.flush()
    assert await rows_of(engine, function_id) == 5
    # Started with the writer, the sweep runs at once.
    log.start()
    try:
        await eventually(has_rows(engine, function_id, 2), within_s=5)
    finally:
        await log.close()
    assert sample(registry, "kiln_invocation_log_rows_deleted_total") >= 3
    async with engine.connect() as conn:
        kept = sorted(
            str(call_id)
            for call_id in await conn.scalars(
                sa.select(Invocation.call_id).where(Invocation.function_id == function_id)
            )
        )
    assert kept == ["router-3", "router-4"]


async def test_a_row_the_database_refuses_is_dropped_alone(engine: AsyncEngine) -> None:
    function_id = uuid.uuid4()
    log, registry = writer(engine)
    good = [record(function_id, n=n) for n in range(3)]
    refused = dataclasses.replace(record(function_id, n=3), method="m" * 100)  # over 63
    for call in (good[0], refused, *good[1:]):
        log.record(call)
    try:
        assert await log.flush() == 4  # taken off the queue, all of them
    finally:
        await log.close()
    assert await rows_of(engine, function_id) == 3
    assert sample(registry, "kiln_invocation_log_rows_written_total") == 3
    assert sample(registry, "kiln_invocation_log_rows_dropped_total") == 1

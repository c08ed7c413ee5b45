"""The invocation log writer: one row per call in PostgreSQL (`invocations`), written in batches
so that no request ever waits for the database.

`record()` only appends to a bounded in-memory queue. A task of the writer's own inserts the
queue in one statement whenever it holds `batch_rows` rows or `flush_every_s` has passed; when
the database fails, the rows stay queued and the insert is retried with backoff. A queue that
reaches `max_pending` rows (the database has been down a long while) drops new rows and counts
them, so memory stays bounded. A second task deletes rows older than the retention setting.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kiln._tasks import cancel_and_wait
from kiln._trouble import Trouble
from kiln.db.enums import InvocationKind, InvocationStatus
from kiln.db.models import Invocation

__all__ = ["COLUMNS", "CallRecord", "InvocationLog", "InvocationLogMetrics"]

_log = logging.getLogger("kiln.invocations")
_TABLE = cast(sa.Table, Invocation.__table__)
_MAX_BACKOFF_S = 30.0
_STATEMENT_ROWS = 500
_DELETE_CHUNK = 10_000  # rows per DELETE, so a long-neglected table never locks for long


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One call, as its router (or the job recorder) saw it. Times are epoch seconds."""

    customer_id: uuid.UUID
    function_id: uuid.UUID
    version_id: uuid.UUID | None
    kind: InvocationKind
    status: InvocationStatus
    started_at: float
    duration_s: float
    call_id: str | None = None
    request_id: str | None = None
    method: str | None = None
    replica_id: str | None = None
    error_code: str | None = None
    queue_wait_s: float | None = None
    execution_s: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    cold_start: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    voice_turns: list[dict[str, Any]] | None = None

    def record(self) -> tuple[Any, ...]:
        """The row, in the order of `COLUMNS`, in the types asyncpg's COPY writes."""
        return (
            self.customer_id,
            self.function_id,
            self.version_id,
            self.replica_id or None,  # asyncpg encodes a UUID's text itself
            self.call_id,
            self.request_id,
            self.method,
            self.kind.value,
            self.status.value,
            self.error_code,
            datetime.fromtimestamp(self.started_at, UTC),
            _ms(self.queue_wait_s),
            _ms(self.duration_s),
            _ms(self.execution_s),
            self.bytes_in,
            self.bytes_out,
            self.cold_start,
            self.prompt_tokens,
            self.completion_tokens,
            None if self.voice_turns is None else json.dumps(self.voice_turns),
        )


COLUMNS = (
    "customer_id", "function_id", "version_id", "replica_id", "call_id", "request_id", "method",
    "kind", "status", "error_code", "started_at", "queue_wait_ms", "duration_ms", "execution_ms",
    "bytes_in", "bytes_out", "cold_start", "prompt_tokens", "completion_tokens",
    "voice_turns",
)  # fmt: skip


class InvocationLogMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.written = Counter(
            "kiln_invocation_log_rows_written",
            "Invocation log rows written to PostgreSQL.",
            registry=registry,
        )
        self.dropped = Counter(
            "kiln_invocation_log_rows_dropped",
            "Invocation log rows dropped: the queue was full (the database unreachable for "
            "long), or the process stopped before they could be written.",
            registry=registry,
        )
        self.pending = Gauge(
            "kiln_invocation_log_pending_rows",
            "Invocation log rows waiting in memory to be written.",
            registry=registry,
        )
        self.write_failures = Counter(
            "kiln_invocation_log_write_failures",
            "Batch inserts that failed and were retried.",
            registry=registry,
        )
        self.deleted = Counter(
            "kiln_invocation_log_rows_deleted",
            "Invocation log rows deleted for being older than the retention.",
            registry=registry,
        )


class InvocationLog:
    def __init__(
        self,
        engine: AsyncEngine,
        metrics: InvocationLogMetrics,
        *,
        retention_s: float,
        batch_rows: int = 100,
        flush_every_s: float = 5.0,
        max_pending: int = 20_000,
        sweep_every_s: float = 3600.0,
        enabled: bool = True,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.retention_s = retention_s
        self.batch_rows = batch_rows
        self.flush_every_s = flush_every_s
        self.max_pending = max_pending
        self.sweep_every_s = sweep_every_s
        self.enabled = enabled
        self._queue: collections.deque[CallRecord] = collections.deque()
        self._full = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._conn: AsyncConnection | None = None

    def record(self, call: CallRecord) -> None:
        """Queue one row; never blocks, never raises."""
        if not self.enabled:
            return
        if len(self._queue) >= self.max_pending:
            self.metrics.dropped.inc()
            return
        self._queue.append(call)
        if len(self._queue) >= self.batch_rows:
            self._full.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if not self.enabled:
            return
        self._tasks = [
            asyncio.create_task(self._write_forever(), name="kiln-invocation-log"),
            asyncio.create_task(self._sweep_forever(), name="kiln-invocation-retention"),
        ]

    async def close(self, within_s: float = 5.0) -> None:
        """Write what is queued, for at most `within_s` (an insert is never cancelled midway
        before that, so no row is written twice), then stop; rows still queued are counted as
        dropped."""
        self._stopping = True
        self._full.set()
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within_s):
                    await asyncio.shield(self._tasks[0])  # the writer
        await cancel_and_wait(*self._tasks, within_s=10)
        self._tasks = []
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None
        if self._queue:
            _log.warning("invocation log: %d rows unwritten at shutdown", len(self._queue))
        self.metrics.dropped.inc(len(self._queue))
        self._queue.clear()
        self.metrics.pending.set(0)

    async def flush(self) -> int:
        """Insert up to 500 queued rows in one statement; the number written. (Encoding rows
        holds the event loop for about 10 us each, so a backlog goes in several statements.)
        On failure the rows stay queued, in order, and the error is raised."""
        batch = [self._queue[i] for i in range(min(len(self._queue), _STATEMENT_ROWS))]
        if not batch:
            return 0
        try:
            written = await self._copy([call.record() for call in batch])
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
            # Some row the database refuses: retrying the batch would refuse it forever and
            # hold up every row behind it. Write the rows one by one; drop the refused ones.
            _log.error("invocation log: a batch was refused (%s); writing it row by row", exc)
            written = await self._copy_each([call.record() for call in batch])
        for _ in batch:
            self._queue.popleft()
        self.metrics.written.inc(written)
        self.metrics.dropped.inc(len(batch) - written)
        self.metrics.pending.set(len(self._queue))
        return len(batch)

    async def _copy(self, records: list[tuple[Any, ...]]) -> int:
        # COPY: about a third of an INSERT's CPU per row (10 against 25-30 us measured), in
        # the process that also serves the calls; over a connection the writer keeps, since a
        # pool checkout and its reset cost more than a batch of 100 rows.
        if self._conn is None:
            self._conn = await self.engine.connect()
        try:
            raw = await self._conn.get_raw_connection()
            driver: Any = raw.driver_connection  # asyncpg's own connection
            await driver.copy_records_to_table("invocations", records=records, columns=COLUMNS)
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError):
            raise  # the connection is fine; the rows are not
        except BaseException:
            await self._drop_connection()
            raise
        return len(records)

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()  # possibly broken: not back into the pool
                await conn.close()

    async def _copy_each(self, records: list[tuple[Any, ...]]) -> int:
        written = 0
        for record in records:
            try:
                written += await self._copy([record])
            except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
                _log.error("invocation log: dropping a row the database refuses: %s", exc)
        return written

    async def delete_expired(self, now: float | None = None) -> int:
        """Delete rows that started longer than the retention ago; the number deleted."""
        cutoff = datetime.fromtimestamp((now or time.time()) - self.retention_s, UTC)
        oldest = (
            sa.select(_TABLE.c.id)
            .where(_TABLE.c.started_at < cutoff)
            .limit(_DELETE_CHUNK)
            .scalar_subquery()
        )
        total = 0
        while True:
            async with self.engine.begin() as conn:
                deleted = await conn.execute(sa.delete(_TABLE).where(_TABLE.c.id.in_(oldest)))
            count = int(deleted.rowcount or 0)
            total += count
            self.metrics.deleted.inc(count)
            if count < _DELETE_CHUNK:
                return total

    async def _write_forever(self) -> None:
        trouble = Trouble(_log, "writing the invocation log (rows are kept and retried)")
        backoff = 0.5
        while not (self._stopping and not self._queue):
            if not self._stopping:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.flush_every_s):
                        await self._full.wait()
            self._full.clear()
            self.metrics.pending.set(len(self._queue))
            try:
                while await self.flush() == _STATEMENT_ROWS:
                    pass  # a backlog: keep writing
                backoff = 0.5
                trouble.ok()
            except Exception as exc:  # noqa: BLE001 - the database is down: keep the rows, retry
                self.metrics.write_failures.inc()
                trouble.failed(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                self._full.set()  # retry at once after the backoff

    async def _sweep_forever(self) -> None:
        while True:
            try:
                deleted = await self.delete_expired()
                if deleted:
                    _log.info("invocation log: deleted %d rows past retention", deleted)
            except Exception as exc:  # noqa: BLE001 - try again at the next sweep
                _log.warning("invocation log: the retention sweep failed: %s", exc)
            await asyncio.sleep(self.sweep_every_s)


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else max(0, round(seconds * 1000))

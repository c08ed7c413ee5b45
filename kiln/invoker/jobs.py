"""A replica's side of async jobs (`POST /v1/spawn`).

A job is a call in the same work queue whose `router` is `JOB_ROUTER`: nobody waits for it.
Its message is acked only when the job is done (with progress acks while it runs), so a replica
that dies mid-job leaves it to be delivered again. Each attempt's outcome goes to the job
events stream (`JobEvent`, published with a message id, so a repeat is dropped) before the
message is acked; the job recorder writes it to PostgreSQL. A failed attempt is retried, up to
the function's `retries`, after a backoff (a NAK with a delay); a job out of attempts ends
`failed` with its last error and is terminated, so a poison job never blocks the others.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import time

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js.errors import APIError, NotFoundError

from kiln._jetstream import MSG_ID, PUBLISH_RETRY_S, publish_durably
from kiln.errors import KilnError, WorkerLost
from kiln.invoker.calls import CallRunner
from kiln.invoker.output import in_call
from kiln.objects import put_object
from kiln.seal import FunctionSealer
from kiln.streams import CALL_ACK_WAIT_S
from kiln.wire import CallHeaders, JobEvent, JobEventKind, Subjects, encode

__all__ = ["JobRunner", "retry_delay_s"]

_log = logging.getLogger("kiln.replica")
# Results up to this size travel in the job event (as base64) and are stored in PostgreSQL.
_INLINE_RESULT_BYTES = 512 * 1024
# Counting a job's started attempts: a compare-and-set, tried again when another delivery of the
# job counted first; each write waits out a leader election for this long at most.
_START_COUNT_TRIES = 3
_START_COUNT_S = 10.0
_EXPECTED_REVISION = "Nats-Expected-Last-Subject-Sequence"
# A delivery whose start cannot be counted (the bucket's stream mid-election) comes back after
# this long, and so on up to this many deliveries beyond the job's attempts; past that,
# deliveries are counted instead, so a job cannot circle forever.
_COUNT_AGAIN_S = 2.0
_UNCOUNTED_DELIVERIES = 20
# A delivery of a job whose attempts all started is not yet proof that they died: after NATS
# was away longer than the queue's ack wait, the job comes again at once, while the replica
# running it (alive, its progress acks lost with the connection) is still reconnecting to
# report its outcome and ack. Such deliveries are counted too, and come back after this long,
# until this many were seen; only then is the last attempt taken for lost (about 12 s more).
_SUSPECT_AGAIN_S = CALL_ACK_WAIT_S
_SUSPECT_DELIVERIES = 2
_WRONG_REVISION = 10071  # JetStream's "wrong last sequence"
_PROGRESS_EVERY_S = CALL_ACK_WAIT_S / 3  # well within the queue's ack wait
_RECORD_OUTCOME_S = 600.0


def retry_delay_s(attempt: int) -> float:
    """How long a job waits after its failed `attempt` (1, 2, ...) before the next one."""
    return float(min(60, 2 ** (attempt - 1)))


class JobRunner:
    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        calls: CallRunner,
        *,
        sealer: FunctionSealer,
        ready_at: float = 0.0,
    ) -> None:
        self.nc = nc
        self.sealer = sealer
        self.js = nc.jetstream()
        self.subjects = subjects
        self.calls = calls
        self.replica = str(calls.replica_id)
        self.ready_at = ready_at  # epoch seconds

    async def run(self, msg: Msg, call: CallHeaders) -> None:
        """Run one delivery of a job, and settle its message: ack (done), NAK with a delay
        (to be retried) or term (out of attempts)."""
        # The job is ours from its delivery: progress acks keep it so while the checks and
        # the STARTED event below wait on NATS (a leader election can take seconds).
        keepalive = asyncio.ensure_future(self._in_progress(msg))
        try:
            await self._run(msg, call)
        finally:
            keepalive.cancel()

    async def _run(self, msg: Msg, call: CallHeaders) -> None:
        job = call.call_id
        attempts = self._attempts
        if await self._cancelled(job):
            await msg.ack()
            return
        attempt = await self._next_attempt(job, msg.metadata.num_delivered)
        if attempt is None:  # its starts are out of reach for now: this delivery comes again
            await msg.nak(delay=_COUNT_AGAIN_S)
            return
        if attempts < attempt <= attempts + _SUSPECT_DELIVERIES:
            await msg.nak(delay=_SUSPECT_AGAIN_S)  # its holder has this long to ack it
            return
        if attempt > attempts:  # earlier attempts died with their replicas
            await self._finish(msg, JobEvent(
                job, JobEventKind.FAILED, attempts, self.replica, final=True,
                error_code=WorkerLost.code,
                error_message=f"the replica running the job stopped in each of its {attempts} "
                "attempts",
            ), term=True)  # fmt: skip
            return
        await self._publish(JobEvent(job, JobEventKind.STARTED, attempt, self.replica))
        started = time.monotonic()
        cold = msg.metadata.timestamp.timestamp() < self.ready_at

        def ended(event: JobEvent, bytes_out: int = 0) -> JobEvent:
            run_s = time.monotonic() - started
            return dataclasses.replace(event, run_s=run_s, bytes_out=bytes_out, cold=cold)

        key = (call.router, job)
        with self.calls.cancellable(key), in_call(job, call.request_id):
            try:
                body = msg.data
                if call.payload is not None:
                    body = await self.calls.payloads.get(self.calls.function_id, call.payload)
                result = await self.calls.compute(call, body)
            except asyncio.CancelledError:
                if not self.calls.cancelled_by_caller(key):
                    raise  # the replica is stopping: the job is delivered again
                await self._finish(
                    msg,
                    ended(JobEvent(job, JobEventKind.CANCELLED, attempt, self.replica, True)),
                )
                return
            except KilnError as exc:
                final = attempt >= attempts
                event = ended(JobEvent(
                    job, JobEventKind.FAILED, attempt, self.replica, final=final,
                    error_code=exc.code, error_message=exc.message,
                ))  # fmt: skip
                if final:
                    await self._finish(msg, event, term=True)
                else:
                    await self._publish(event)
                    await msg.nak(delay=retry_delay_s(attempt))
                return
        succeeded = await self._succeeded(job, attempt, result.body, result.content_type)
        await self._finish(msg, ended(succeeded, len(result.body)))

    async def _succeeded(self, job: str, attempt: int, body: bytes, content_type: str) -> JobEvent:
        event = JobEvent(
            job, JobEventKind.SUCCEEDED, attempt, self.replica, final=True,
            content_type=content_type,
        )  # fmt: skip
        if len(body) <= _INLINE_RESULT_BYTES:
            return dataclasses.replace(event, result_b64=base64.b64encode(body).decode())
        bucket = self.subjects.job_results_bucket(self.calls.function_id)
        await put_object(self.js, bucket, job, body)
        return dataclasses.replace(event, result_ref=job)

    async def _finish(self, msg: Msg, event: JobEvent, *, term: bool = False) -> None:
        """Record the outcome, then settle the message. If the outcome cannot be recorded the
        message stays unacked, and the job is delivered again. The outcome is known, and the
        job stays ours meanwhile (its progress acks go on): try for as long as NATS might
        reasonably be away."""
        await self._publish(event, within_s=_RECORD_OUTCOME_S)
        if term:
            await msg.term()
        else:
            await msg.ack()

    async def _publish(self, event: JobEvent, *, within_s: float = PUBLISH_RETRY_S) -> None:
        # The message id makes a repeat (a retry here, or a redelivered job) a no-op.
        subject = self.subjects.job_events(self.calls.function_id, event.job_id)
        body = encode(event)
        headers = {
            # The function's too: the stream drops repeats across every function's events.
            # A verdict another replica reached about this attempt is not its own outcome:
            # neither may be dropped as a repeat of the other.
            MSG_ID: f"{self.calls.function_id.hex}:{event.job_id}:{event.attempt}:{event.kind}"
            + (":lost" if event.error_code == WorkerLost.code else ""),
            **(self.sealer.headers(subject, body) or {}),
        }
        # Through a leader election or a reconnect, for `within_s`; then the caller (the job's
        # run) fails, and the job is delivered again.
        await publish_durably(self.js, subject, body, headers=headers, within_s=within_s)

    async def _next_attempt(self, job: str, delivered: int) -> int | None:
        """The number of the attempt this delivery makes: one more than the attempts that
        started before it, as the job-starts bucket counts them (and counted up here). A
        delivery can be lost on its way to a replica while a leader election moves the queue's
        consumer; it comes again, delivered twice but started never, and is no lost attempt.
        None where the bucket cannot be read or written now (counting deliveries instead would
        take such lost deliveries for attempts that died); after many such deliveries,
        deliveries are counted. Beyond the job's attempts, the count goes on for the deliveries
        that suspect its last attempt lost (`_SUSPECT_DELIVERIES`)."""
        uncounted = delivered if delivered > self._attempts + _UNCOUNTED_DELIVERIES else None
        bucket = self.subjects.job_starts_bucket
        subject = f"$KV.{bucket}.{self.calls.function_id.hex}.{job}"
        for _ in range(_START_COUNT_TRIES):
            try:
                started, revision = await self._started(bucket, subject)
                if started + 1 > self._attempts + _SUSPECT_DELIVERIES:
                    return started + 1  # taken for lost: not counted
                await publish_durably(
                    self.js,
                    subject,
                    str(started + 1).encode(),
                    headers={
                        MSG_ID: f"{self.calls.function_id.hex}:{job}:start:{delivered}",
                        _EXPECTED_REVISION: str(revision),
                    },
                    within_s=_START_COUNT_S,
                )
                return started + 1
            except APIError as exc:
                if exc.err_code != _WRONG_REVISION:
                    _log.warning("job %s: its starts could not be counted: %s", job, exc)
                    return uncounted
                # Another delivery of the job counted meanwhile: count again.
            except Exception as exc:  # noqa: BLE001 - NATS away: the delivery comes again
                _log.warning("job %s: its starts could not be counted: %s", job, exc)
                return uncounted
        return uncounted

    @property
    def _attempts(self) -> int:
        return self.calls.spec.resources.retries + 1

    async def _started(self, bucket: str, subject: str) -> tuple[int, int]:
        """The attempts of a job that started, and the revision of that count (0: none)."""
        try:
            entry = await self.js.get_msg(f"KV_{bucket}", subject=subject, direct=True)
        except NotFoundError:
            return 0, 0
        if (entry.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
            return 0, entry.seq or 0
        return int(entry.data or b"0"), entry.seq or 0

    async def _cancelled(self, job: str) -> bool:
        """Whether the job's key is in the cancellation bucket (read by direct get: a replica's
        account reaches no other JetStream API)."""
        bucket = self.subjects.job_cancels_bucket
        try:
            entry = await self.js.get_msg(
                f"KV_{bucket}", subject=f"$KV.{bucket}.{job}", direct=True
            )
        except (NotFoundError, NoRespondersError):
            return False
        return (entry.headers or {}).get("KV-Operation") not in ("DEL", "PURGE")

    async def _in_progress(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(_PROGRESS_EVERY_S)
            with contextlib.suppress(Exception):
                await msg.in_progress()

"""A job delivered again after all its attempts started is not lost at once: the replica
running its last attempt may only have been cut off from NATS (its progress acks lost, so the
queue delivered the job again) and still ack it. Only deliveries that keep coming mean the
attempt died with its replica. Against a real nats-server, with a real job runner."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any, cast

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig

from kiln._nats import connect_options
from kiln.invoker import jobs
from kiln.invoker.calls import CallRunner
from kiln.invoker.jobs import JobRunner
from kiln.seal import FunctionSealer
from kiln.settings import Settings
from kiln.streams import CALLS, ensure_job_streams, ensure_stream
from kiln.wire import JOB_ROUTER, CallHeaders, JobEvent, Subjects, decode

pytestmark = pytest.mark.integration

_WAIT_S = 10.0


class _Calls:
    """What a job runner needs of a replica's call runner: a job that runs until released."""

    def __init__(self, *, retries: int = 0) -> None:
        self.replica_id = uuid.uuid4()
        self.function_id = uuid.uuid4()
        self.spec = SimpleNamespace(resources=SimpleNamespace(retries=retries))
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    @contextlib.contextmanager
    def cancellable(self, key: object) -> Iterator[None]:
        yield

    def cancelled_by_caller(self, key: object) -> bool:
        return False

    async def compute(self, call: CallHeaders, body: bytes) -> Any:
        self.started.set()
        await self.release.wait()
        return SimpleNamespace(body=body, content_type="application/json")


@pytest.fixture(name="nc")
async def connected(settings: Settings) -> AsyncIterator[NATS]:
    nc = await nats.connect(**connect_options(settings))
    await ensure_stream(nc.jetstream(), CALLS, settings.namespace, replicas=1)
    await ensure_job_streams(nc.jetstream(), settings.namespace, replicas=1)
    yield nc
    await nc.close()


async def _queue(nc: NATS, subjects: Subjects, calls: _Calls) -> tuple[Any, CallHeaders]:
    """A job in the function's queue, and a pull consumer whose ack wait (1 s) runs out before
    the runner's first progress ack: a second delivery while the first still runs."""
    js = nc.jetstream()
    job = CallHeaders(str(uuid.uuid4()), JOB_ROUTER, "application/json", 0, 60)
    await js.publish(subjects.calls(calls.function_id), b'{"x": 1}', headers=job.to_headers())
    pulls = await js.pull_subscribe(
        subjects.calls(calls.function_id),
        durable=f"test_{calls.function_id.hex}",
        stream=subjects.calls_stream,
        config=ConsumerConfig(ack_wait=1.0),
    )
    return pulls, job


async def _next(pulls: Any) -> Msg:
    (msg,) = await pulls.fetch(1, timeout=_WAIT_S)
    return cast(Msg, msg)


async def _events(nc: NATS, subjects: Subjects, calls: _Calls, job: str) -> list[JobEvent]:
    """The job's events in the stream, in order (read by sequence: a work queue stream takes
    no second consumer beside the recorder's)."""
    js = nc.jetstream()
    subject = subjects.job_events(calls.function_id, job)
    state = (await js.stream_info(subjects.job_events_stream)).state
    events = []
    for seq in range(state.first_seq, state.last_seq + 1):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            stored = await js.get_msg(subjects.job_events_stream, seq)
            if stored.subject == subject and stored.data:
                events.append(decode(JobEvent, stored.data))
    return events


async def test_a_last_attempt_whose_replica_comes_back_is_not_taken_for_lost(
    nc: NATS, settings: Settings
) -> None:
    subjects = Subjects(settings.namespace)
    calls = _Calls()
    runner = JobRunner(nc, subjects, cast(CallRunner, calls), sealer=FunctionSealer(None))
    pulls, job = await _queue(nc, subjects, calls)
    holder = asyncio.ensure_future(runner.run(await _next(pulls), job))
    await asyncio.wait_for(calls.started.wait(), _WAIT_S)
    # Its one attempt started; the queue gives the job again: NAKed, not judged.
    again = await _next(pulls)
    assert again.metadata.num_delivered == 2
    await asyncio.wait_for(runner.run(again, job), _WAIT_S)
    calls.release.set()
    await asyncio.wait_for(holder, _WAIT_S)
    events = await _events(nc, subjects, calls, job.call_id)
    assert [(e.kind, e.attempt, e.error_code) for e in events] == [
        ("started", 1, None),
        ("succeeded", 1, None),
    ]
    # The holder's ack took the job out of the queue: it never comes again.
    with pytest.raises(nats.errors.TimeoutError):
        await pulls.fetch(1, timeout=2.5)  # past the NAK's delay and the ack wait


async def test_a_last_attempt_whose_replica_died_is_lost_after_the_suspicion(
    nc: NATS, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "_SUSPECT_AGAIN_S", 0.2)
    subjects = Subjects(settings.namespace)
    calls = _Calls()
    runner = JobRunner(nc, subjects, cast(CallRunner, calls), sealer=FunctionSealer(None))
    pulls, job = await _queue(nc, subjects, calls)
    dead = asyncio.ensure_future(runner.run(await _next(pulls), job))
    await asyncio.wait_for(calls.started.wait(), _WAIT_S)
    dead.cancel()  # its replica died: no ack, no progress, no outcome
    with contextlib.suppress(asyncio.CancelledError):
        await dead
    verdicts = []
    for delivery in range(2, 3 + jobs._SUSPECT_DELIVERIES):
        msg = await _next(pulls)
        assert msg.metadata.num_delivered == delivery
        await asyncio.wait_for(runner.run(msg, job), _WAIT_S)
        verdicts.append(len(await _events(nc, subjects, calls, job.call_id)))
    # Two suspicions added nothing; the third delivery gave the verdict, for attempt 1.
    events = await _events(nc, subjects, calls, job.call_id)
    assert [(e.kind, e.attempt, e.final, e.error_code) for e in events] == [
        ("started", 1, False, None),
        ("failed", 1, True, "worker_lost"),
    ]
    assert verdicts == [1, 1, 2]
    lost = "the replica running the job stopped in each of its 1 attempts"
    assert events[1].error_message == lost
    with pytest.raises(nats.errors.TimeoutError):
        await pulls.fetch(1, timeout=1.5)  # terminated: it never comes again

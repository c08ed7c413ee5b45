"""The JetStream pieces of async jobs, created on first use by the router and the recorder:
the job events stream, the results object store and the cancellations key-value bucket."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import (
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError

from kiln._jetstream import ensure_stream
from kiln.wire import Subjects

__all__ = ["ensure_job_streams"]

# Queued jobs wait in the calls stream at most a day (its max_age): a cancellation need not
# be remembered longer.
_CANCELS_TTL_S = 25 * 3600.0


async def ensure_job_streams(js: JetStreamContext, subjects: Subjects, result_ttl_s: float) -> None:
    events = StreamConfig(
        name=subjects.job_events_stream,
        subjects=[subjects.all_job_events],
        # Each event is removed once the recorder has written it down.
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=120,
    )
    await ensure_stream(js, events)
    try:
        await js.object_store(subjects.job_results_bucket)
    except (BucketNotFoundError, NotFoundError):
        await js.create_object_store(
            subjects.job_results_bucket,
            ObjectStoreConfig(ttl=result_ttl_s, storage=StorageType.FILE),
        )
    try:
        await js.key_value(subjects.job_cancels_bucket)
    except (BucketNotFoundError, NotFoundError):
        await js.create_key_value(
            KeyValueConfig(bucket=subjects.job_cancels_bucket, ttl=_CANCELS_TTL_S, history=1)
        )

"""The JetStream pieces of async jobs: the job events stream and the cancellations key-value
bucket (created on first use by the router and the recorder), and each function's results
object store (created by a node agent before the function's replicas start)."""

from __future__ import annotations

import dataclasses
import uuid

from nats.js import JetStreamContext
from nats.js.api import (
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError

from kiln._jetstream import ensure_stream, match_replicas
from kiln.payloads import ensure_payload_bucket
from kiln.wire import Subjects

__all__ = ["ensure_function_stores", "ensure_job_streams"]

# Queued jobs wait in the calls stream at most a day (its max_age): a cancellation need not
# be remembered longer.
_CANCELS_TTL_S = 25 * 3600.0


async def ensure_job_streams(
    js: JetStreamContext, subjects: Subjects, *, replicas: int = 1
) -> None:
    """The job events stream and the cancellations bucket, each with `replicas` copies."""
    events = StreamConfig(
        num_replicas=replicas,
        name=subjects.job_events_stream,
        subjects=[subjects.all_job_events],
        # Each event is removed once the recorder has written it down.
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=120,
    )
    await ensure_stream(js, events)
    # Replicas read it by direct get (their functions' accounts reach no other JetStream API).
    cancels = f"KV_{subjects.job_cancels_bucket}"
    try:
        info = await js.stream_info(cancels)
    except NotFoundError:
        await js.create_key_value(
            KeyValueConfig(
                bucket=subjects.job_cancels_bucket,
                ttl=_CANCELS_TTL_S,
                history=1,
                direct=True,
                replicas=replicas,
            )
        )
    else:
        config = info.config
        # made before replicas read it that way, or before the cluster grew
        if not config.allow_direct or (config.num_replicas or 1) != replicas:
            await js.update_stream(
                dataclasses.replace(config, allow_direct=True, num_replicas=replicas)
            )


async def ensure_function_stores(
    js: JetStreamContext,
    subjects: Subjects,
    function_id: uuid.UUID,
    result_ttl_s: float,
    *,
    replicas: int = 1,
) -> None:
    """The function's own buckets: its payloads and its jobs' large results. A node agent
    makes them before a replica starts, since the replica's credentials cannot."""
    await ensure_payload_bucket(js, subjects.payload_bucket(function_id), replicas=replicas)
    bucket = subjects.job_results_bucket(function_id)
    try:
        await js.object_store(bucket)
    except (BucketNotFoundError, NotFoundError):
        config = ObjectStoreConfig(ttl=result_ttl_s, storage=StorageType.FILE, replicas=replicas)
        await js.create_object_store(bucket, config)
    else:
        await match_replicas(js, f"OBJ_{bucket}", replicas)

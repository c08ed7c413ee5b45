"""Small JetStream helpers shared by the parts that keep data in NATS: creating streams and
buckets, and publishing into a stream so that a leader election or a reconnect does not lose
the message."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig, PubAck, StorageType, StreamConfig
from nats.js.errors import (
    BucketNotFoundError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from kiln._nats import reconnect_delay

__all__ = [
    "MSG_ID",
    "PUBLISH_RETRY_S",
    "RETRYABLE_PUBLISH_ERRORS",
    "ensure_stream",
    "key_value",
    "match_replicas",
    "object_store",
    "publish_durably",
]

MSG_ID = "Nats-Msg-Id"
# A stream leader election in a cluster takes a few seconds; a reconnect, about one.
PUBLISH_RETRY_S = 15.0
_ATTEMPT_TIMEOUT_S = 2.0
# What JetStream says (or does not) while a stream has no leader or the link is coming back.
RETRYABLE_PUBLISH_ERRORS: tuple[type[Exception], ...] = (
    NoStreamResponseError,
    ServiceUnavailableError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
)


async def publish_durably(
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    *,
    headers: dict[str, Any],
    within_s: float = PUBLISH_RETRY_S,
) -> PubAck:
    """Publish into a stream and wait for it to confirm, retrying what a leader election or a
    reconnect answers (no responders, 503, no answer) for `within_s`, then raising the last
    error. `headers` must carry the message's id (`Nats-Msg-Id`): a retry of a publish that was
    in fact stored is then dropped by the stream as a duplicate."""
    if MSG_ID not in headers:
        raise ValueError(f"publish_durably needs a {MSG_ID} header, so retries deduplicate")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    attempt = 0
    while True:
        left = deadline - loop.time()
        try:
            return await js.publish(
                subject, payload, headers=headers, timeout=max(0.1, min(_ATTEMPT_TIMEOUT_S, left))
            )
        except RETRYABLE_PUBLISH_ERRORS:
            pause = reconnect_delay(attempt)
            if loop.time() + pause >= deadline:
                raise
            await asyncio.sleep(pause)
            attempt += 1


async def object_store(js: JetStreamContext, bucket: str, *, replicas: int = 1) -> ObjectStore:
    """The file-backed object store `bucket`, created on first use with `replicas` copies
    (`KILN_STREAM_REPLICAS`)."""
    try:
        found = await js.object_store(bucket)
    except (BucketNotFoundError, NotFoundError):
        config = ObjectStoreConfig(storage=StorageType.FILE, replicas=replicas)
        return await js.create_object_store(bucket, config)
    await match_replicas(js, f"OBJ_{bucket}", replicas)
    return found


async def key_value(
    js: JetStreamContext, bucket: str, *, ttl_s: float, replicas: int = 1
) -> KeyValue:
    """The key-value bucket `bucket` (entries expire `ttl_s` after their last write), created
    on first use with `replicas` copies."""
    try:
        found = await js.key_value(bucket)
    except (BucketNotFoundError, NotFoundError):
        config = KeyValueConfig(bucket=bucket, ttl=ttl_s, history=1, replicas=replicas)
        return await js.create_key_value(config)
    await match_replicas(js, f"KV_{bucket}", replicas)
    return found


async def match_replicas(js: JetStreamContext, stream: str, replicas: int) -> None:
    """Bring an existing stream (a bucket's) to `replicas` copies: `KILN_STREAM_REPLICAS` was
    raised (a cluster grew) after the bucket was made."""
    info = await js.stream_info(stream)
    if (info.config.num_replicas or 1) != replicas:
        await js.update_stream(dataclasses.replace(info.config, num_replicas=replicas))


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream `config` describes, or bring an existing one's settings up to it."""
    try:
        await js.add_stream(config)
    except Exception:  # noqa: BLE001 - exists already (maybe with other limits): update it
        await js.update_stream(config)

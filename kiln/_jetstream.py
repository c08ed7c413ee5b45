"""Small JetStream helpers shared by the parts that keep files in NATS."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig, StorageType, StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

__all__ = ["ensure_stream", "key_value", "object_store"]


async def object_store(js: JetStreamContext, bucket: str) -> ObjectStore:
    """The file-backed object store `bucket`, created on first use."""
    try:
        return await js.object_store(bucket)
    except (BucketNotFoundError, NotFoundError):
        return await js.create_object_store(bucket, ObjectStoreConfig(storage=StorageType.FILE))


async def key_value(js: JetStreamContext, bucket: str, *, ttl_s: float) -> KeyValue:
    """The key-value bucket `bucket` (entries expire `ttl_s` after their last write), created
    on first use."""
    try:
        return await js.key_value(bucket)
    except (BucketNotFoundError, NotFoundError):
        return await js.create_key_value(KeyValueConfig(bucket=bucket, ttl=ttl_s, history=1))


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream `config` describes, or bring an existing one's settings up to it."""
    try:
        await js.add_stream(config)
    except Exception:  # noqa: BLE001 - exists already (maybe with other limits): update it
        await js.update_stream(config)

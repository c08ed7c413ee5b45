"""Call bodies, results and stream chunks too large for one NATS message travel through a
JetStream object store instead: the sender stores the bytes under a random name and sends the
name (`Kiln-Payload`) in an empty message; the receiver takes them (reads, then deletes).
Objects also expire with the bucket's TTL, so one whose receiver died does not stay forever."""

from __future__ import annotations

import contextlib
import secrets

from nats.js import JetStreamContext
from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from kiln.errors import InternalError
from kiln.wire import Subjects

__all__ = ["MAX_RESULT_BYTES", "PAYLOAD_TTL_S", "PayloadStore"]

# Longer than a call can wait and run, so a payload outlives its call; deleted when taken.
PAYLOAD_TTL_S = 24 * 3600.0
# The largest result (or stream chunk) a replica sends: a router holds it in memory.
MAX_RESULT_BYTES = 1 << 30


class PayloadStore:
    def __init__(self, js: JetStreamContext, subjects: Subjects) -> None:
        self.js = js
        self.bucket = subjects.payload_bucket
        self._store: ObjectStore | None = None

    async def _open(self) -> ObjectStore:
        if self._store is None:
            try:
                self._store = await self.js.object_store(self.bucket)
            except (BucketNotFoundError, NotFoundError):
                config = ObjectStoreConfig(ttl=PAYLOAD_TTL_S, storage=StorageType.FILE)
                self._store = await self.js.create_object_store(self.bucket, config)
        return self._store

    async def put(self, data: bytes) -> str:
        """Store `data`; the name to send in its place."""
        name = secrets.token_hex(16)
        await (await self._open()).put(name, data)
        return name

    async def take(self, name: str) -> bytes:
        """The bytes stored under `name`, which are then deleted."""
        data = await self.get(name)
        await self.delete(name)
        return data

    async def get(self, name: str) -> bytes:
        """The bytes stored under `name` (kept: a job's body serves each of its attempts)."""
        store = await self._open()
        try:
            result = await store.get(name)
        except (ObjectNotFoundError, NotFoundError):
            raise InternalError(f"payload {name} is not in the store (expired?)") from None
        return result.data or b""

    async def delete(self, name: str) -> None:
        store = await self._open()
        with contextlib.suppress(Exception):  # it expires anyway
            await store.delete(name)

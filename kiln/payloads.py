"""Call bodies, results and stream chunks too large for one NATS message travel through a
JetStream object store instead: the sender stores the bytes under a random name and sends the
name (`Kiln-Payload`) in an empty message; the receiver takes them (reads, then deletes).
Objects also expire with the bucket's TTL, so one whose receiver died does not stay forever."""

from __future__ import annotations

import contextlib
import secrets
import uuid

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError, ObjectNotFoundError

from kiln.errors import InternalError
from kiln.objects import delete_object, put_object, read_object
from kiln.streams import PAYLOADS, object_store
from kiln.wire import Subjects

__all__ = [
    "MAX_RESULT_BYTES",
    "PayloadStore",
]

# The largest result (or stream chunk) a replica sends: a router holds it in memory.
MAX_RESULT_BYTES = 1 << 30


class PayloadStore:
    """Each function's payloads, in a bucket of its own (a replica's credentials reach only its
    function's). Platform processes create a bucket on first use with `replicas` copies
    (`KILN_STREAM_REPLICAS`); a replica (`replicas=None`) creates none: it finds its bucket made
    by its node agent. Objects are written and read with kiln.objects, which a replica's NATS
    account allows."""

    def __init__(self, js: JetStreamContext, subjects: Subjects, *, replicas: int | None) -> None:
        self.js = js
        self.subjects = subjects
        self.replicas = replicas
        self._made: set[uuid.UUID] = set()

    async def _bucket(self, function_id: uuid.UUID) -> str:
        bucket = self.subjects.payload_bucket(function_id)
        if self.replicas is not None and function_id not in self._made:
            await object_store(self.js, PAYLOADS, bucket, replicas=self.replicas)
            self._made.add(function_id)
        return bucket

    async def put(self, function_id: uuid.UUID, data: bytes) -> str:
        """Store `data`; the name to send in its place."""
        name = secrets.token_hex(16)
        await put_object(self.js, await self._bucket(function_id), name, data)
        return name

    async def take(self, function_id: uuid.UUID, name: str) -> bytes:
        """The bytes stored under `name`, which are then deleted."""
        data = await self.get(function_id, name)
        await self.delete(function_id, name)
        return data

    async def get(self, function_id: uuid.UUID, name: str) -> bytes:
        """The bytes stored under `name` (kept: a job's body serves each of its attempts)."""
        try:
            return await read_object(self.js, await self._bucket(function_id), name)
        except (ObjectNotFoundError, NotFoundError):
            raise InternalError(f"payload {name} is not in the store (expired?)") from None

    async def delete(self, function_id: uuid.UUID, name: str) -> None:
        with contextlib.suppress(Exception):  # it expires anyway
            await delete_object(self.js, await self._bucket(function_id), name)

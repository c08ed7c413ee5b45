"""Blobs in JetStream's object store (`nats://`, the default): one bucket per area, made on
first use with the cluster's replication."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from kiln.blobs.base import BlobMissing
from kiln.streams import Bucket, object_store, patient

__all__ = ["NatsBlobs"]


class NatsBlobs:
    def __init__(self, js: JetStreamContext, kind: Bucket, bucket: str, *, replicas: int) -> None:
        self.js = js
        self.kind = kind
        self.bucket = bucket
        self.replicas = replicas
        self._store: ObjectStore | None = None
        self._opening = asyncio.Lock()

    async def _objects(self) -> ObjectStore:
        async with self._opening:
            if self._store is None:
                self._store = await object_store(
                    self.js, self.kind, self.bucket, replicas=self.replicas
                )
        return self._store

    async def has(self, name: str) -> bool:
        store = await self._objects()
        try:
            await store.get_info(name)
        except (ObjectNotFoundError, NotFoundError):
            return False
        return True

    @patient  # a write waits out a leader election (the cluster forming, a server restarting)
    async def put_bytes(self, name: str, data: bytes) -> None:
        await (await self._objects()).put(name, data)

    @patient
    async def put_file(self, name: str, path: Path) -> None:
        with path.open("rb") as f:
            await (await self._objects()).put(name, f)

    async def get_bytes(self, name: str) -> bytes:
        store = await self._objects()
        try:
            result = await store.get(name)
        except (ObjectNotFoundError, NotFoundError):
            raise BlobMissing(name) from None
        return result.data or b""

    async def get_into(self, name: str, path: Path) -> None:
        store = await self._objects()
        try:
            with path.open("wb") as f:
                await store.get(name, writeinto=f)
        except (ObjectNotFoundError, NotFoundError):
            await asyncio.to_thread(path.unlink, missing_ok=True)
            raise BlobMissing(name) from None

    async def delete(self, name: str) -> None:
        store = await self._objects()
        with contextlib.suppress(ObjectNotFoundError, NotFoundError):
            await store.delete(name)

    async def close(self) -> None:
        return None

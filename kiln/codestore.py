"""Code artifacts (packaged app sources) in the NATS JetStream object store, keyed by their
sha256 digest. The router writes them at deploy time; node agents read them to start replicas.
Content addressing makes a repeated upload harmless and a corrupted download detectable."""

from __future__ import annotations

import hashlib

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from kiln.errors import InternalError, NotFound
from kiln.streams import CODE, object_store, patient
from kiln.wire import Subjects

__all__ = ["CodeStore"]


class CodeStore:
    def __init__(self, js: JetStreamContext, subjects: Subjects, *, replicas: int) -> None:
        self.js = js
        self.bucket = subjects.code_bucket
        self.replicas = replicas
        self._store: ObjectStore | None = None

    async def _open(self) -> ObjectStore:
        if self._store is None:
            self._store = await object_store(self.js, CODE, self.bucket, replicas=self.replicas)
        return self._store

    @patient  # a deploy waits out a leader election (the cluster forming, a server restarting)
    async def put(self, digest: str, archive: bytes) -> None:
        store = await self._open()
        try:
            await store.get_info(digest)
            return  # same digest, same bytes
        except (ObjectNotFoundError, NotFoundError):
            pass
        await store.put(digest, archive)

    async def get(self, digest: str) -> bytes:
        store = await self._open()
        try:
            result = await store.get(digest)
        except (ObjectNotFoundError, NotFoundError):
            raise NotFound(f"code artifact {digest} is not in the store") from None
        data = result.data or b""
        if hashlib.sha256(data).hexdigest() != digest:
            raise InternalError(f"code artifact {digest} is corrupted in the store")
        return data

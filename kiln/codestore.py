"""Code artifacts (packaged app sources) in the blob store `KILN_STORE_URL` names, keyed by
their sha256 digest. The router writes them at deploy time; node agents read them to start
replicas. Content addressing makes a repeated upload harmless and a corrupted download
detectable."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from kiln.blobs import Area, BlobMissing, BlobStore, open_blob_store
from kiln.errors import InternalError, NotFound

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from kiln.settings import Settings

__all__ = ["CodeStore", "code_store"]


def code_store(settings: Settings, js: JetStreamContext) -> CodeStore:
    """The code area of the store `KILN_STORE_URL` names."""
    return CodeStore(open_blob_store(settings, Area.CODE, js))


class CodeStore:
    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs

    async def put(self, digest: str, archive: bytes) -> None:
        if await self.blobs.has(digest):
            return  # same digest, same bytes
        await self.blobs.put_bytes(digest, archive)

    async def get(self, digest: str) -> bytes:
        try:
            data = await self.blobs.get_bytes(digest)
        except BlobMissing:
            raise NotFound(f"code artifact {digest} is not in the store") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise InternalError(f"code artifact {digest} is corrupted in the store")
        return data

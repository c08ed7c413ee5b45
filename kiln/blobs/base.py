"""What every blob store does: named blobs in one area, written whole, read whole or into a
file, asked after and deleted."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Protocol

__all__ = ["Area", "BlobMissing", "BlobStore"]


class Area(enum.StrEnum):
    CODE = "code"
    SNAPSHOTS = "snapshots"
    VOLUMES = "volumes"  # stopped pods' volumes, parked to move between nodes (file:// and s3://)


class BlobMissing(LookupError):
    """The store has no blob of that name."""


class BlobStore(Protocol):
    async def has(self, name: str) -> bool: ...

    async def put_bytes(self, name: str, data: bytes) -> None: ...

    async def put_file(self, name: str, path: Path) -> None:
        """Store the file at `path` as `name` (streamed: it may be larger than memory)."""

    async def get_bytes(self, name: str) -> bytes:
        """The blob; `BlobMissing` when there is none."""

    async def get_into(self, name: str, path: Path) -> None:
        """Write the blob into the file `path` (created or replaced); `BlobMissing` when there
        is none."""

    async def delete(self, name: str) -> None:
        """Remove the blob; nothing when there is none."""

    async def close(self) -> None: ...

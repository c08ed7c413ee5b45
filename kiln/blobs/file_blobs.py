"""Blobs as files under a directory (`file:///path`): a volume every process mounts. Writes
land in a temporary file renamed into place, so a reader never sees half a blob."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from kiln.blobs.base import BlobMissing

__all__ = ["FileBlobs"]


class FileBlobs:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"blob name {name!r} leaves the store")
        return path

    async def has(self, name: str) -> bool:
        return await asyncio.to_thread(self._path(name).is_file)

    async def put_bytes(self, name: str, data: bytes) -> None:
        await asyncio.to_thread(self._write, name, lambda tmp: tmp.write_bytes(data))

    async def put_file(self, name: str, path: Path) -> None:
        await asyncio.to_thread(self._write, name, lambda tmp: shutil.copyfile(path, tmp))

    def _write(self, name: str, fill: Callable[[Path], object]) -> None:
        target = self._path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        try:
            fill(tmp)
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)

    async def get_bytes(self, name: str) -> bytes:
        try:
            return await asyncio.to_thread(self._path(name).read_bytes)
        except FileNotFoundError:
            raise BlobMissing(name) from None

    async def get_into(self, name: str, path: Path) -> None:
        try:
            await asyncio.to_thread(shutil.copyfile, self._path(name), path)
        except FileNotFoundError:
            raise BlobMissing(name) from None

    async def delete(self, name: str) -> None:
        await asyncio.to_thread(self._path(name).unlink, missing_ok=True)

    async def close(self) -> None:
        return None

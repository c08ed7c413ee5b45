"""Blobs in S3 or an S3-compatible service (`s3://bucket/prefix`), through boto3.

A blob is the object `<prefix>/<area>/<name>`. Writes of large files are multipart (boto3's
managed transfer: parts sent in parallel). Reads of large objects are ranged and parallel: the
file is sized first, then `_STREAMS` threads each GET a byte range and write it at its offset,
so a node fills its snapshot cache at the speed of several connections rather than one.
boto3 blocks, so every call runs in a worker thread; its client is thread-safe.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kiln.blobs.base import Area, BlobMissing

__all__ = ["S3Blobs"]

_PART_BYTES = 64 * 1024 * 1024  # a ranged read's or a multipart write's piece
_STREAMS = 8  # ranged reads (and multipart writes) of one blob at once
_WRITE_BYTES = 1024 * 1024  # written to the file as it arrives, in pieces of this size
_MISSING = ("404", "NoSuchKey", "NotFound")


class S3Blobs:
    def __init__(
        self,
        bucket: str,
        prefix: str,
        area: Area,
        *,
        endpoint_url: str | None = None,
        streams: int = _STREAMS,
        part_bytes: int = _PART_BYTES,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/{area.value}/" if prefix.strip("/") else f"{area}/"
        self.streams = streams
        self.part_bytes = part_bytes
        self._client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(
                max_pool_connections=streams * 2 + 4,
                retries={"max_attempts": 5, "mode": "standard"},
            ),
        )
        self._transfer = TransferConfig(
            multipart_threshold=part_bytes, multipart_chunksize=part_bytes,
            max_concurrency=streams, use_threads=True,
        )  # fmt: skip

    def key(self, name: str) -> str:
        return self.prefix + name

    async def has(self, name: str) -> bool:
        try:
            await asyncio.to_thread(self._head, name)
        except BlobMissing:
            return False
        return True

    def _head(self, name: str) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        try:
            head: dict[str, Any] = self._client.head_object(Bucket=self.bucket, Key=self.key(name))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING:
                raise BlobMissing(name) from None
            raise
        return head

    async def put_bytes(self, name: str, data: bytes) -> None:
        await asyncio.to_thread(
            self._client.put_object, Bucket=self.bucket, Key=self.key(name), Body=data
        )

    async def put_file(self, name: str, path: Path) -> None:
        await asyncio.to_thread(
            self._client.upload_file, str(path), self.bucket, self.key(name),
            Config=self._transfer,
        )  # fmt: skip

    async def get_bytes(self, name: str) -> bytes:
        return await asyncio.to_thread(self._get_bytes, name)

    def _get_bytes(self, name: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=self.key(name))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING:
                raise BlobMissing(name) from None
            raise
        data: bytes = answer["Body"].read()
        return data

    async def get_into(self, name: str, path: Path) -> None:
        await asyncio.to_thread(self.download, name, path)

    def download(self, name: str, path: Path, *, streams: int | None = None) -> int:
        """Read the blob into `path` with up to `streams` ranged GETs at once (one: a single
        stream); its size. Every range is of the same version of the object (its ETag); on any
        failure the file is removed, never left with holes."""
        head = self._head(name)
        size, etag = int(head["ContentLength"]), str(head["ETag"])
        ranges = [
            (start, min(size, start + self.part_bytes) - 1)
            for start in range(0, size, self.part_bytes)
        ]
        lanes = max(1, min(streams or self.streams, len(ranges) or 1))
        try:
            with path.open("wb") as f:
                os.ftruncate(f.fileno(), size)
                if lanes == 1:
                    if size:
                        self._read_range(name, etag, f.fileno(), 0, size - 1, whole=True)
                    return size
                with ThreadPoolExecutor(lanes, thread_name_prefix="kiln-s3-read") as pool:
                    reads = [
                        pool.submit(self._read_range, name, etag, f.fileno(), a, b)
                        for a, b in ranges
                    ]
                    try:
                        for read in reads:
                            read.result()
                    except BaseException:
                        pool.shutdown(wait=True, cancel_futures=True)
                        raise
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return size

    def _read_range(
        self, name: str, etag: str, fd: int, first: int, last: int, *, whole: bool = False
    ) -> None:
        asked: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(name), "IfMatch": etag}
        if not whole:
            asked["Range"] = f"bytes={first}-{last}"
        body = self._client.get_object(**asked)["Body"]
        offset = first
        try:
            for piece in body.iter_chunks(_WRITE_BYTES):
                view = memoryview(piece)
                while view:  # pwrite may write less than asked (a full disk says so)
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written
        finally:
            body.close()
        if offset != last + 1:
            raise OSError(f"{name}: read {offset - first} bytes of {last + 1 - first}")

    async def delete(self, name: str) -> None:
        await asyncio.to_thread(self._client.delete_object, Bucket=self.bucket, Key=self.key(name))

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)

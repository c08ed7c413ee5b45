"""Restore a snapshot's CUDA blob: disk (or page cache) → pinned staging ring → GPU.

The blob is cut into chunks of at most `chunk_bytes` (never across a storage). Reader threads
fill the ring's pinned buffers with `preadv`; as each fills, its host-to-device copy is issued
on one of several CUDA streams, and an event marks when the buffer may be refilled. Reads of
later chunks overlap copies of earlier ones. The ring (pinned memory is slow to allocate) is made
once per process, ahead of time in a standby process, and reused.
"""

from __future__ import annotations

import ctypes
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.errors import SnapshotError
from kiln.snapshots.blob import BlobEntry, read_index

__all__ = ["Chunk", "CudaStorages", "StagingRing", "plan_chunks"]

# Measured on an H100 host (16 cores, PCIe 5): a 2 GiB blob from the page cache restores at
# 18.7 GiB/s with 4 x 64 MiB slots and 2 streams, 31.4 GiB/s with 16 x 16 MiB and 4 streams;
# the readers alone reach 44 GiB/s with 16 threads and the copy engine 51 GiB/s.
DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024
DEFAULT_SLOTS = 16
DEFAULT_STREAMS = 4


@dataclass(frozen=True)
class Chunk:
    entry: str
    file_offset: int
    start: int  # within the storage
    length: int


def plan_chunks(entries: list[BlobEntry], chunk_bytes: int) -> list[Chunk]:
    """Chunks in file order, each within one storage and at most `chunk_bytes` long."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    chunks = []
    for entry in sorted(entries, key=lambda e: e.offset):
        for start in range(0, entry.nbytes, chunk_bytes):
            length = min(chunk_bytes, entry.nbytes - start)
            chunks.append(Chunk(entry.name, entry.offset + start, start, length))
    return chunks


class StagingRing:
    """Pinned host buffers and CUDA streams for copies to one device."""

    def __init__(
        self,
        device: torch.device | None = None,
        *,
        slots: int = DEFAULT_SLOTS,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        streams: int = DEFAULT_STREAMS,
    ) -> None:
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        self.chunk_bytes = chunk_bytes
        self.buffers = [
            torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(slots)
        ]
        self.streams = [
            torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
            for _ in range(streams)
        ]
        self.events: list[torch.cuda.Event | None] = [None] * slots
        self.readers = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="kiln-stage")

    def load(self, path: Path, targets: dict[str, torch.Tensor]) -> None:
        """Fill each target (a uint8 device tensor per storage) with its bytes from `path`."""
        index, _ = read_index(path)
        chunks = plan_chunks([e for e in index.entries if e.name in targets], self.chunk_bytes)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._pipeline(fd, chunks, targets)
        finally:
            os.close(fd)

    def _pipeline(self, fd: int, chunks: list[Chunk], targets: dict[str, torch.Tensor]) -> None:
        slots = len(self.buffers)
        pending: deque[tuple[int, Chunk, Future[None]]] = deque()
        for number, chunk in enumerate(chunks):
            slot = number % slots
            if len(pending) == slots:
                # The ring is full: the oldest read holds this slot; copy it out first.
                self._copy(*pending.popleft(), targets)
            event = self.events[slot]
            if event is not None:
                event.synchronize()  # the slot's previous copy has left the pinned buffer
            future = self.readers.submit(self._read, fd, self.buffers[slot], chunk)
            pending.append((slot, chunk, future))
        while pending:
            self._copy(*pending.popleft(), targets)
        for stream in self.streams:
            stream.synchronize()

    @staticmethod
    def _read(fd: int, buffer: torch.Tensor, chunk: Chunk) -> None:
        view = memoryview((ctypes.c_char * chunk.length).from_address(buffer.data_ptr())).cast("B")
        done = 0
        while done < chunk.length:
            got = os.preadv(fd, [view[done:]], chunk.file_offset + done)
            if got <= 0:
                raise SnapshotError(f"the blob ended early, at byte {chunk.file_offset + done}")
            done += got

    def _copy(
        self, slot: int, chunk: Chunk, read: Future[None], targets: dict[str, torch.Tensor]
    ) -> None:
        read.result()
        stream = self.streams[slot % len(self.streams)]
        with torch.cuda.stream(stream):
            target = targets[chunk.entry].narrow(0, chunk.start, chunk.length)
            target.copy_(self.buffers[slot].narrow(0, 0, chunk.length), non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        self.events[slot] = event

    def close(self) -> None:
        self.readers.shutdown(wait=True)


_ring: StagingRing | None = None


def staging_ring() -> StagingRing:
    """This process's ring, made on first use (a standby process makes it before it is needed)."""
    global _ring
    if _ring is None:
        _ring = StagingRing()
    return _ring


class CudaStorages:
    """The storages of a CUDA blob, copied to the current device."""

    def __init__(self, path: Path, ring: StagingRing | None = None) -> None:
        if not torch.cuda.is_available():
            raise SnapshotError("the snapshot holds CUDA tensors but this process has no GPU")
        self.ring = ring or staging_ring()
        index, _ = read_index(path)
        # Each storage its own allocation (the caching allocator makes these cheap), so every
        # storage is exactly as large as it was when baked.
        self.targets = {
            e.name: torch.empty(e.nbytes, dtype=torch.uint8, device=self.ring.device)
            for e in index.entries
        }
        self.ring.load(path, self.targets)

    def device(self, kind: str) -> torch.device:
        return self.ring.device

    def storage(self, kind: str, name: str) -> torch.UntypedStorage:
        try:
            return self.targets[name].untyped_storage()
        except KeyError:
            raise SnapshotError(f"the snapshot blob has no storage {name!r}") from None

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.ring.device)

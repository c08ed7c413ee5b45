"""Restore a snapshot's CUDA blob: disk (or page cache) → pinned staging ring → GPU.

The blob is cut into chunks of at most `chunk_bytes` (never across a storage). The ring has one
pinned buffer per reader thread. Each reader takes the next chunk, fills its buffer with
`preadv`, issues the buffer's host-to-device copy on one of several CUDA streams, waits for
that copy to leave the buffer (the wait lets go of the GIL) and takes the next chunk, so the
other readers' reads overlap every copy and the copy engine always has work queued. The ring
(pinned memory is slow to allocate) is made once per process, ahead of time in a standby
process, and reused; `prepare` does all of a GPU standby's work before it is assigned.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.errors import SnapshotError
from kiln.snapshots.blob import BlobEntry, read_index

__all__ = ["Chunk", "CudaStorages", "StagingRing", "plan_chunks", "prepare", "staging_ring"]

# Measured on a lent H100 (PCIe 5, 16 cores), a 2 GiB blob in the page cache: these defaults
# restore at 39-40 GiB/s, against 51.5 GiB/s for one pinned host-to-device copy and 44-45 GiB/s
# for 16 preadv threads reading into pinned memory. One sweep (4 loads each, not repeated) gave
# 16 x 8 MiB 45.6 GiB/s, 16 x 4 MiB 31, 8 x 16 MiB 33, 24-32 slots 25-28, and 2 or 8 streams
# instead of 4 about 37: worth a second sweep before changing the defaults.
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
    """Pinned host buffers (one per reader thread) and CUDA streams for copies to one device."""

    def __init__(
        self,
        device: torch.device | None = None,
        *,
        slots: int = DEFAULT_SLOTS,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        streams: int = DEFAULT_STREAMS,
    ) -> None:
        if slots <= 0 or streams <= 0:
            raise ValueError("a staging ring needs at least one slot and one stream")
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        self.chunk_bytes = chunk_bytes
        self.buffers = [
            torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(slots)
        ]
        self.streams = [
            torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
            for _ in range(streams)
        ]
        self.events = [
            torch.cuda.Event()  # type: ignore[no-untyped-call]
            for _ in range(slots)
        ]
        self.readers = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="kiln-stage")
        self._busy = threading.Lock()  # one load at a time: the buffers are shared

    def load(self, path: Path, targets: dict[str, torch.Tensor]) -> None:
        """Fill each target (a uint8 device tensor per storage) with its bytes from `path`."""
        index, _ = read_index(path)
        chunks = plan_chunks([e for e in index.entries if e.name in targets], self.chunk_bytes)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            with self._busy:
                self._pipeline(fd, chunks, targets)
        finally:
            os.close(fd)

    def _pipeline(self, fd: int, chunks: list[Chunk], targets: dict[str, torch.Tensor]) -> None:
        # The targets were allocated on the current stream; the copies run on the ring's own.
        current = torch.cuda.current_stream(self.device)
        for stream in self.streams:
            stream.wait_stream(current)
        work = iter(chunks)
        take = threading.Lock()
        failed = threading.Event()
        readers = min(len(self.buffers), len(chunks))
        futures = [
            self.readers.submit(self._drain, slot, fd, work, take, failed, targets)
            for slot in range(readers)
        ]
        errors = []
        for future in futures:
            try:
                future.result()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the copies
                errors.append(exc)
        # Every copy issued must be finished before the buffers are reused or the targets read.
        for stream in self.streams:
            stream.synchronize()
        if errors:
            raise errors[0]

    def _drain(
        self,
        slot: int,
        fd: int,
        work: Iterator[Chunk],
        take: threading.Lock,
        failed: threading.Event,
        targets: dict[str, torch.Tensor],
    ) -> None:
        """One reader: read a chunk into this slot's buffer, copy it out, repeat."""
        buffer = self.buffers[slot]
        event = self.events[slot]
        stream = self.streams[slot % len(self.streams)]
        try:
            with torch.cuda.stream(stream):  # a thread's current stream (and device) is its own
                while not failed.is_set():
                    with take:
                        chunk = next(work, None)
                    if chunk is None:
                        return
                    _read(fd, buffer, chunk)
                    target = targets[chunk.entry].narrow(0, chunk.start, chunk.length)
                    target.copy_(buffer.narrow(0, 0, chunk.length), non_blocking=True)
                    event.record(stream)
                    event.synchronize()  # the copy has left the buffer: it may be refilled
        except BaseException:
            failed.set()
            raise

    def close(self) -> None:
        self.readers.shutdown(wait=True)


def _read(fd: int, buffer: torch.Tensor, chunk: Chunk) -> None:
    view = memoryview((ctypes.c_char * chunk.length).from_address(buffer.data_ptr())).cast("B")
    done = 0
    while done < chunk.length:
        got = os.preadv(fd, [view[done:]], chunk.file_offset + done)
        if got <= 0:
            raise SnapshotError(f"the blob ended early, at byte {chunk.file_offset + done}")
        done += got


_ring: StagingRing | None = None


def staging_ring() -> StagingRing:
    """This process's ring, made on first use (a standby process makes it before it is needed)."""
    global _ring
    if _ring is None:
        _ring = StagingRing()
    return _ring


def prepare() -> StagingRing:
    """What a GPU standby does before it is assigned, so that a cold start pays for none of it:
    create the CUDA context, the cuBLAS handle and workspace (the first matrix product's cost
    otherwise), and this process's staging ring (pinned buffers, streams, reader threads)."""
    torch.cuda.init()  # type: ignore[no-untyped-call]
    ring = staging_ring()
    with torch.cuda.device(ring.device):
        torch.cuda.current_blas_handle()  # type: ignore[no-untyped-call]
        a = torch.ones(64, 64, dtype=torch.bfloat16, device=ring.device)
        (a @ a).sum().item()
    # Start every reader thread now (a pool makes its threads on first use): each start waits
    # at the barrier until all have started, so none is reused for another's start.
    barrier = threading.Barrier(len(ring.buffers))
    list(ring.readers.map(lambda _: barrier.wait(timeout=60), range(len(ring.buffers))))
    return ring


class CudaStorages:
    """The storages of a CUDA blob, copied to the current device."""

    def __init__(self, path: Path, ring: StagingRing | None = None) -> None:
        if not torch.cuda.is_available():
            raise SnapshotError("the snapshot holds CUDA tensors but this process has no GPU")
        self.ring = ring or staging_ring()
        index, _ = read_index(path)
        began = time.perf_counter()
        # Each storage its own allocation (the caching allocator makes these cheap), so every
        # storage is exactly as large as it was when baked.
        self.targets = {
            e.name: torch.empty(e.nbytes, dtype=torch.uint8, device=self.ring.device)
            for e in index.entries
        }
        allocated = time.perf_counter()
        self.ring.load(path, self.targets)
        # The copies are queued on the ring's streams: what is left is `synchronize`'s.
        self.alloc_s, self.copy_s = allocated - began, time.perf_counter() - allocated

    def device(self, kind: str) -> torch.device:
        return self.ring.device

    def storage(self, kind: str, name: str) -> torch.UntypedStorage:
        try:
            return self.targets[name].untyped_storage()
        except KeyError:
            raise SnapshotError(f"the snapshot blob has no storage {name!r}") from None

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.ring.device)

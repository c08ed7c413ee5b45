"""Restore: put a snapshot's object graph back together around its storages, in place.

CPU, shared (the default): the blob is mapped copy-on-write (`MAP_PRIVATE`) and each storage is
a view of the mapping. Nothing is copied: the pages are the page cache's, so every replica of the
function on the node shares one physical copy, and a replica that writes to a weight gets its own
copy of that page only, never changing the file or its neighbours. The mappings are populated
before the restore returns (`MADV_POPULATE_READ`, from several threads, in chunks), so the first
call does not stop on a page fault for every 4 KiB of weights it touches: the restore pays for
moving the bytes, once, at the speed of parallel reads. `MAP_POPULATE` is not used because on a
private writable mapping it would copy every page; kernels older than 5.14 lack
`MADV_POPULATE_READ` and get `MADV_WILLNEED` (reads start at once, the faults stay).

CPU, private: one buffer for the whole data section, filled with large `preadv` calls from
several threads (for code that writes its weights a lot, or to keep no file mapped).

CUDA storages are restored by `kiln.snapshots.cuda`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import mmap
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln.errors import SnapshotError
from kiln.snapshots.blob import BlobEntry, read_index
from kiln.snapshots.capture import rebuild
from kiln.snapshots.manifest import GRAPH, blob_name
from kiln.snapshots.store import Snapshot

__all__ = ["STEPS", "Restored", "restore_state"]

_READ_CHUNK = 64 * 1024 * 1024
_READERS = 8
_POPULATE_CHUNK = 32 * 1024 * 1024
# <linux/mman.h>; Python's mmap module does not name it (3.11).
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


# The steps of a restore, in order, each timed (`Restored.steps`): what the cold-start report
# calls `restore_<step>` beside `restore`, their sum.
STEPS = (
    "graph_read",  # graph.pkl off the disk
    "cpu_pages",  # the CPU blob mapped and its pages faulted in (or read into private buffers)
    "gpu_alloc",  # one device allocation per CUDA storage
    "gpu_copy",  # the CUDA blob through the pinned staging ring to the device
    "unpickle",  # the object graph rebuilt around the storages
    "gpu_sync",  # waiting for the last copies to land
)


@dataclass(frozen=True)
class Restored:
    state: dict[str, Any]
    tensor_bytes: int
    seconds: float
    mode: str  # "mapped" or "copied"
    steps: dict[str, float] = field(default_factory=dict)  # STEPS that ran, in seconds


class _CpuStorages:
    """Storages of a CPU blob: each entry mapped on its own (entries are page-aligned, so each
    mapping is exactly one storage), or read into its own private buffer."""

    def __init__(self, path: Path, *, private: bool) -> None:
        self.index, _ = read_index(path)
        entries = {entry.name: entry for entry in self.index.entries}
        fd = os.open(path, os.O_RDONLY)
        try:
            if private:
                self._storages = _read_private(fd, path, entries)
            else:
                self._storages = {name: _map(fd, e) for name, e in entries.items()}
                _populate(list(self._storages.values()))
        finally:
            os.close(fd)  # the mappings stay valid without it

    def device(self, kind: str) -> torch.device:
        return torch.device("cpu")

    def storage(self, kind: str, name: str) -> torch.UntypedStorage:
        try:
            return self._storages[name]
        except KeyError:
            raise SnapshotError(f"the snapshot blob has no storage {name!r}") from None


def _map(fd: int, entry: BlobEntry) -> torch.UntypedStorage:
    mapping = mmap.mmap(
        fd,
        entry.nbytes,
        flags=mmap.MAP_PRIVATE,
        prot=mmap.PROT_READ | mmap.PROT_WRITE,
        offset=entry.offset,
    )
    # The storage holds the mapping: it is unmapped when the last tensor viewing it goes.
    return torch.frombuffer(mapping, dtype=torch.uint8).untyped_storage()


def _populate(storages: list[torch.UntypedStorage]) -> None:
    """Fault every page of the mappings in, read-only (sharing the page cache's pages)."""
    jobs = [
        (s.data_ptr() + start, min(_POPULATE_CHUNK, s.nbytes() - start))
        for s in storages
        for start in range(0, s.nbytes(), _POPULATE_CHUNK)
    ]
    if not jobs:
        return
    madvise = _libc().madvise

    def populate(job: tuple[int, int]) -> None:
        address, length = job
        # ctypes lets go of the GIL for the call, so the threads fault pages in parallel.
        if madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), _MADV_POPULATE_READ) == 0:
            return
        error = ctypes.get_errno()
        if error != errno.EINVAL:
            raise SnapshotError(f"could not read the snapshot's pages in: {os.strerror(error)}")
        # A kernel before 5.14: start the reads, let the first touches fault.
        madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), mmap.MADV_WILLNEED)

    with ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="kiln-populate") as pool:
        list(pool.map(populate, jobs))


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.madvise.restype = ctypes.c_int
    return libc


def _read_private(
    fd: int, path: Path, entries: dict[str, BlobEntry]
) -> dict[str, torch.UntypedStorage]:
    buffers = {name: torch.empty(e.nbytes, dtype=torch.uint8) for name, e in entries.items()}
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    jobs = [
        (buffers[name].data_ptr() + start, e.offset + start, min(_READ_CHUNK, e.nbytes - start))
        for name, e in entries.items()
        for start in range(0, e.nbytes, _READ_CHUNK)
    ]

    def read(job: tuple[int, int, int]) -> None:
        address, position, length = job
        view = memoryview((ctypes.c_char * length).from_address(address)).cast("B")
        done = 0
        while done < length:
            got = os.preadv(fd, [view[done:]], position + done)
            if got <= 0:
                raise SnapshotError(f"{path.name} ended early, at byte {position + done}")
            done += got

    with ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="kiln-restore") as pool:
        list(pool.map(read, jobs))
    return {name: buffer.untyped_storage() for name, buffer in buffers.items()}


def restore_state(snapshot: Snapshot, *, private: bool = False) -> Restored:
    """The captured attributes, with every tensor in place. Raises SnapshotError.

    The tensors come back as they were baked, plain tensors, even when the caller is inside
    `torch.inference_mode()`: inference tensors could never be updated in place outside it,
    and the CUDA path's reader threads (outside it, as every new thread is) could not even
    fill them."""
    with torch.inference_mode(False):
        return _restore_state(snapshot, private=private)


def _restore_state(snapshot: Snapshot, *, private: bool) -> Restored:
    started = time.perf_counter()
    steps = _Steps()
    with steps.timing("graph_read"):
        graph = snapshot.file(GRAPH).read_bytes()
    devices: dict[str, Any] = {}
    if blob_name("cuda") in snapshot.manifest.files:
        from kiln.snapshots.cuda import CudaStorages

        cuda = CudaStorages(snapshot.file(blob_name("cuda")))
        steps.seconds.update(gpu_alloc=cuda.alloc_s, gpu_copy=cuda.copy_s)
        devices["cuda"] = cuda
    if blob_name("cpu") in snapshot.manifest.files:
        with steps.timing("cpu_pages"):
            devices["cpu"] = _CpuStorages(snapshot.file(blob_name("cpu")), private=private)
    with steps.timing("unpickle"):
        state = rebuild(graph, _ByDevice(devices))
    if not isinstance(state, dict):
        raise SnapshotError("the snapshot's object graph is not an instance's attributes")
    if "cuda" in devices:
        with steps.timing("gpu_sync"):
            devices["cuda"].synchronize()
    return Restored(
        state=state,
        tensor_bytes=snapshot.manifest.tensor_bytes,
        seconds=time.perf_counter() - started,
        mode="copied" if private else "mapped",
        steps={step: steps.seconds[step] for step in STEPS if step in steps.seconds},
    )


class _Steps:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timing(self, step: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = time.perf_counter() - began


class _ByDevice:
    def __init__(self, devices: dict[str, Any]) -> None:
        self.devices = devices

    def _for(self, kind: str) -> Any:
        found = self.devices.get(kind)
        if found is None:
            if kind == "cpu":
                return _NoBlob()
            raise SnapshotError(f"the snapshot has tensors on {kind} but no {kind} blob")
        return found

    def device(self, kind: str) -> torch.device:
        device: torch.device = self._for(kind).device(kind)
        return device

    def storage(self, kind: str, name: str) -> torch.UntypedStorage:
        storage: torch.UntypedStorage = self._for(kind).storage(kind, name)
        return storage


class _NoBlob:
    """CPU tensors with no bytes (zero-size) need a device but no blob."""

    def device(self, kind: str) -> torch.device:
        return torch.device("cpu")

    def storage(self, kind: str, name: str) -> torch.UntypedStorage:
        raise SnapshotError(f"the snapshot has no cpu blob for storage {name!r}")

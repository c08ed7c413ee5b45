"""The tensor blob of a snapshot: a valid safetensors file laid out for restoring at hardware
speed.

Each entry is one *storage* (the bytes under one or more tensors), stored once however many
tensors view it; the object graph says which tensor is which view. The header is padded with
spaces and every entry starts on a 4 KiB boundary of the file, so the file can be mapped and
each storage used in place, or read with large aligned reads; the gaps between entries are
themselves entries (`__pad_N`, bytes), because safetensors allows no holes. Kiln's own index
(entry order, offsets and sizes as Kiln reads them) is in the header's `__metadata__`.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from kiln.errors import SnapshotError

if TYPE_CHECKING:
    import torch

__all__ = ["ALIGN", "BlobEntry", "BlobIndex", "read_index", "write_blob"]

ALIGN = 4096
FORMAT = "kiln-blob-1"
_INDEX_KEY = "kiln.index"
_MAX_HEADER = 64 * 1024 * 1024

# torch dtype name -> safetensors dtype; anything else is written as raw bytes (U8).
_ST_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2}
_ITEMSIZE |= {"I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class BlobEntry:
    """One storage in the blob: `nbytes` bytes at `offset` from the start of the file."""

    name: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class BlobIndex:
    entries: tuple[BlobEntry, ...]
    size: int  # of the whole file

    def entry(self, name: str) -> BlobEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise SnapshotError(f"the snapshot blob has no storage {name!r}")


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _layout(sizes: list[tuple[str, str, int]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """The padded header and each storage's offset in the data section."""
    offsets = []
    position = 0
    for _, _, nbytes in sizes:
        offsets.append(position)
        position = _round_up(position + nbytes)
    header: dict[str, Any] = {}
    pads = 0
    for (name, dtype, nbytes), begin in zip(sizes, offsets, strict=True):
        itemsize = _ITEMSIZE[dtype]
        if nbytes % itemsize:
            dtype, itemsize = "U8", 1
        header[name] = {
            "dtype": dtype,
            "shape": [nbytes // itemsize],
            "data_offsets": [begin, begin + nbytes],
        }
        gap_end = _round_up(begin + nbytes)
        if gap_end > begin + nbytes:
            header[f"__pad_{pads}"] = {
                "dtype": "U8",
                "shape": [gap_end - begin - nbytes],
                "data_offsets": [begin + nbytes, gap_end],
            }
            pads += 1
    index = [[name, begin, nbytes] for (name, _, nbytes), begin in zip(sizes, offsets, strict=True)]
    header["__metadata__"] = {**metadata, "kiln.format": FORMAT, _INDEX_KEY: json.dumps(index)}
    text = json.dumps(header, separators=(",", ":")).encode()
    padded = _round_up(8 + len(text)) - 8
    return text + b" " * (padded - len(text)), offsets


def write_blob(
    path: Path,
    storages: Iterable[tuple[str, torch.UntypedStorage, torch.dtype]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write CPU storages (name, storage, dtype of a tensor viewing it) as one blob; return
    the file's size. The caller makes the write atomic (a temporary name, then a rename)."""
    items = list(storages)
    sizes = [(name, _st_dtype(dtype), storage.nbytes()) for name, storage, dtype in items]
    header, offsets = _layout(sizes, dict(metadata or {}))
    data_start = 8 + len(header)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        end = 0
        for (_, storage, _), begin in zip(items, offsets, strict=True):
            if storage.device.type != "cpu":
                raise SnapshotError("write_blob takes CPU storages; copy device storages first")
            out.write(b"\0" * (begin - end))
            _write_storage(out, storage)
            end = begin + storage.nbytes()
        out.write(b"\0" * (_round_up(end) - end))
        out.flush()
        os.fsync(out.fileno())
        return data_start + _round_up(end) if items else data_start


def _write_storage(out: BinaryIO, storage: torch.UntypedStorage) -> None:
    nbytes = storage.nbytes()
    if nbytes == 0:
        return
    # The storage's own memory, without a copy (and without needing numpy).
    view = memoryview((ctypes.c_char * nbytes).from_address(storage.data_ptr())).cast("B")
    step = 64 * 1024 * 1024
    for start in range(0, nbytes, step):
        out.write(view[start : start + step])


def _st_dtype(dtype: torch.dtype) -> str:
    return _ST_DTYPES.get(str(dtype).removeprefix("torch."), "U8")


def read_index(path: Path) -> tuple[BlobIndex, dict[str, str]]:
    """Read and check the blob's header: Kiln's index, with absolute offsets, and the metadata."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SnapshotError(f"{path.name} is too short to be a snapshot blob")
        (length,) = struct.unpack("<Q", raw)
        if length > min(_MAX_HEADER, size - 8):
            raise SnapshotError(f"{path.name} declares a header of {length} bytes; it is damaged")
        try:
            header = json.loads(f.read(length))
            metadata = header["__metadata__"]
            if metadata.get("kiln.format") != FORMAT:
                raise SnapshotError(
                    f"{path.name} is in format {metadata.get('kiln.format')!r}, "
                    f"this Kiln reads {FORMAT!r}"
                )
            index = json.loads(metadata[_INDEX_KEY])
        except (ValueError, KeyError, TypeError) as exc:
            raise SnapshotError(f"{path.name} has an unreadable header ({exc})") from None
    data_start = 8 + length
    entries = []
    for name, begin, nbytes in index:
        offset = data_start + int(begin)
        if offset % ALIGN or offset + int(nbytes) > size:
            raise SnapshotError(f"storage {name!r} of {path.name} lies outside the file")
        entries.append(BlobEntry(str(name), offset, int(nbytes)))
    return BlobIndex(tuple(entries), size), dict(metadata)

"""Bake: capture an instance whose `@enter(snap=True)` hooks have run into a snapshot directory.

The baker runs customer code, so it holds no signing key: it writes the object graph and one
tensor blob per device kind into a staging directory, and the node agent seals it (hashes,
manifest, signature, atomic rename into its cache; see `store`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.snapshots.blob import write_blob
from kiln.snapshots.capture import capture
from kiln.snapshots.manifest import BAKE_REPORT, GRAPH, blob_name

__all__ = ["BakeReport", "bake"]


@dataclass(frozen=True)
class BakeReport:
    tensors: int
    storages: int
    tensor_bytes: int
    seconds: float


def _to_host(storage: torch.UntypedStorage) -> torch.UntypedStorage:
    host = torch.empty(storage.nbytes(), dtype=torch.uint8)
    host.untyped_storage().copy_(storage)
    return host.untyped_storage()


def bake(instance: Any, directory: Path) -> BakeReport:
    """Write `instance`'s attributes into `directory`: `graph.pkl`, `cpu.safetensors` and/or
    `cuda.safetensors`, and `bake.json`. Raises SnapshotError for state that cannot be kept."""
    started = time.perf_counter()
    captured = capture(dict(vars(instance)))
    directory.mkdir(parents=True, exist_ok=True)
    total = 0
    for device, slots in captured.by_device().items():
        if device == "cuda":
            torch.cuda.synchronize()
        storages = [
            (slot.name, slot.storage if device == "cpu" else _to_host(slot.storage), slot.dtype)
            for slot in slots
        ]
        total += sum(storage.nbytes() for _, storage, _ in storages)
        write_blob(directory / blob_name(device), storages, {"kiln.device": device})
    (directory / GRAPH).write_bytes(captured.graph)
    report = BakeReport(
        tensors=captured.tensors,
        storages=len(captured.storages),
        tensor_bytes=total,
        seconds=time.perf_counter() - started,
    )
    (directory / BAKE_REPORT).write_text(json.dumps(asdict(report)))
    return report

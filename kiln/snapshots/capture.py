"""Capture an object graph with its tensors taken out, and put it back together around storages
that are already in place.

The graph is pickled with every tensor (parameters, buffers, loose tensors, inside any container)
replaced by a reference: the first time a tensor is met the reference carries how to rebuild it
(its storage, offset, size, stride, dtype, whether it is a parameter), later meetings only its
number, so one tensor object comes back as one object (`a.weight is b.weight`). Storages are
collected once each, in the order they are first met, which is about the order a forward pass
uses them. Rebuilding a tensor is a view onto a storage the restorer provides (mapped from the
blob or copied to the GPU): no weight is allocated twice or initialised.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from kiln.errors import SnapshotError

__all__ = ["Captured", "StorageProvider", "StorageSlot", "capture", "rebuild"]

_PROTOCOL = 5


@dataclass
class StorageSlot:
    """One storage to be stored: its name in the blob of its device type."""

    name: str
    device: str  # "cpu" or "cuda": the blob it goes into
    storage: torch.UntypedStorage
    dtype: torch.dtype  # of the first tensor met that views it (labels the safetensors entry)


@dataclass
class Captured:
    graph: bytes
    storages: list[StorageSlot] = field(default_factory=list)
    tensors: int = 0

    def by_device(self) -> dict[str, list[StorageSlot]]:
        grouped: dict[str, list[StorageSlot]] = {}
        for slot in self.storages:
            grouped.setdefault(slot.device, []).append(slot)
        return grouped


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=_PROTOCOL)
        self.refs: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []  # ids stay unique while we hold the objects
        self.slots: dict[tuple[str, int, int], StorageSlot] = {}

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj)
        if isinstance(obj, torch.UntypedStorage | torch.TypedStorage):
            raise SnapshotError(
                "a bare torch storage cannot be captured; keep tensors instead of storages"
            )
        return None

    def _tensor(self, tensor: torch.Tensor) -> tuple[Any, ...]:
        known = self.refs.get(id(tensor))
        if known is not None:
            return ("ref", known)
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            raise SnapshotError(
                f"tensors of type {type(tensor).__name__} cannot be captured yet; only plain "
                "tensors and nn.Parameter"
            )
        if tensor.layout is not torch.strided or tensor.is_quantized:
            raise SnapshotError(
                f"a {tensor.layout} tensor cannot be captured; only dense (strided) tensors"
            )
        number = len(self.keep)
        self.refs[id(tensor)] = number
        self.keep.append(tensor)
        device = tensor.device.type
        storage_name = None
        if tensor.numel() > 0 and device != "meta":
            if device not in ("cpu", "cuda"):
                raise SnapshotError(f"tensors on {device} cannot be captured; only cpu and cuda")
            storage = tensor.untyped_storage()
            key = (device, tensor.device.index or 0, storage.data_ptr())
            slot = self.slots.get(key)
            if slot is None:
                slot = StorageSlot(f"s{len(self.slots)}", device, storage, tensor.dtype)
                self.slots[key] = slot
            storage_name = slot.name
        return (
            "new",
            number,
            isinstance(tensor, torch.nn.Parameter),
            device,
            storage_name,
            tensor.storage_offset(),
            tuple(tensor.size()),
            tuple(tensor.stride()),
            str(tensor.dtype).removeprefix("torch."),
            tensor.requires_grad,
        )


def capture(state: dict[str, Any]) -> Captured:
    """Pickle `state` (an instance's attributes) with its tensors taken out."""
    buffer = io.BytesIO()
    pickler = _Pickler(buffer)
    try:
        pickler.dump(state)
    except SnapshotError:
        raise
    except Exception as exc:  # noqa: BLE001 - pickling raises many types; name the attribute
        raise SnapshotError(_which_attribute(state, exc)) from None
    return Captured(buffer.getvalue(), list(pickler.slots.values()), len(pickler.keep))


def _which_attribute(state: dict[str, Any], exc: Exception) -> str:
    for name, value in state.items():
        try:
            _Pickler(io.BytesIO()).dump(value)
        except Exception as inner:  # noqa: BLE001 - the same failure, now with its attribute
            return (
                f"self.{name} cannot be captured in a snapshot ({type(inner).__name__}: {inner}); "
                "create it in a plain @kiln.enter() hook instead, which runs after every restore"
            )
    return f"the instance cannot be captured in a snapshot ({type(exc).__name__}: {exc})"


class StorageProvider(Protocol):
    """Where the restorer put the blobs' storages."""

    def device(self, kind: str) -> torch.device:
        """The device that tensors captured on `kind` ("cpu", "cuda") come back on."""

    def storage(self, kind: str, name: str) -> torch.UntypedStorage:
        """Storage `name` of the blob of device kind `kind`, in place."""


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, storages: StorageProvider) -> None:
        super().__init__(file)
        self.storages = storages
        self.tensors: dict[int, torch.Tensor] = {}

    def persistent_load(self, pid: Any) -> Any:
        if pid[0] == "ref":
            return self.tensors[pid[1]]
        _, number, is_param, device, storage_name, offset, size, stride, dtype_name, grad = pid
        dtype = getattr(torch, dtype_name)
        if storage_name is None:
            target = torch.device("meta") if device == "meta" else self.storages.device(device)
            tensor = torch.empty_strided(size, stride, dtype=dtype, device=target)
        else:
            storage = self.storages.storage(device, storage_name)
            tensor = torch.empty(0, dtype=dtype, device=storage.device)
            tensor.set_(storage, offset, size, stride)
        if is_param:
            tensor = torch.nn.Parameter(tensor, requires_grad=grad)
        elif grad:
            tensor.requires_grad_(True)
        self.tensors[number] = tensor
        return tensor


def rebuild(graph: bytes, storages: StorageProvider) -> Any:
    """Unpickle a captured graph around the storages the provider holds in place."""
    try:
        return _Unpickler(io.BytesIO(graph), storages).load()
    except SnapshotError:
        raise
    except Exception as exc:
        raise SnapshotError(f"the snapshot's objects cannot be rebuilt ({exc})") from exc

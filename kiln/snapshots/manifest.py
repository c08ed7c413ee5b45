"""What a snapshot is and who vouches for it: its key, its manifest and the manifest's signature.

The key is content-addressed: the function's code digest and name together with the format and
the runtime versions (Python, torch, Kiln), so a snapshot made by other versions is simply never
found. The manifest lists every file with its size and sha256 and is signed with HMAC-SHA256
under the platform's snapshot key by the node agent, which never runs customer code, so a
snapshot altered anywhere after sealing is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from kiln._version import __version__
from kiln.errors import SnapshotError, SnapshotTampered
from kiln.snapshots.imports import module_names

__all__ = [
    "BAKE_REPORT",
    "FORMAT_VERSION",
    "GRAPH",
    "MANIFEST",
    "SIGNATURE",
    "FileEntry",
    "Manifest",
    "Runtime",
    "blob_name",
    "sha256_file",
    "sign",
    "snapshot_key",
    "verify_signature",
]

FORMAT_VERSION = 1
# The files of a snapshot directory.
GRAPH = "graph.pkl"  # the object graph, tensors replaced by references
BAKE_REPORT = "bake.json"  # what the baker counted, read when sealing
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"


def blob_name(device: str) -> str:
    """The tensor blob of one device kind: `cpu.safetensors`, `cuda.safetensors`."""
    return f"{device}.safetensors"


@dataclass(frozen=True)
class Runtime:
    python: str
    torch: str
    kiln: str

    @classmethod
    def current(cls) -> Runtime:
        """This environment's versions, without importing torch."""
        try:
            torch_version = metadata.version("torch")
        except metadata.PackageNotFoundError:
            torch_version = "none"
        return cls(
            python=f"{sys.version_info.major}.{sys.version_info.minor}."
            f"{sys.version_info.micro}-{platform.machine()}",
            torch=torch_version,
            kiln=__version__,
        )


def snapshot_key(code_digest: str, function: str, runtime: Runtime, device: str = "cpu") -> str:
    """The snapshot's name: what made it (code, function, versions) and where its tensors
    live (`cpu`, or `cuda` for a function that runs on GPUs)."""
    identity = {
        "format": FORMAT_VERSION,
        "code_digest": code_digest,
        "function": function,
        "runtime": asdict(runtime),
        "device": device,
    }
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    key: str
    function: str
    code_digest: str
    runtime: Runtime
    files: dict[str, FileEntry]
    tensors: int
    storages: int
    tensor_bytes: int
    bake_seconds: float
    # What the function needed imported to restore and serve (`kiln.snapshots.imports`):
    # standbys import it ahead of time. Leaves only; empty in snapshots from before Kiln learnt it.
    imports: tuple[str, ...] = ()
    format: int = FORMAT_VERSION
    created_at: float = field(default_factory=time.time)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            raw = json.loads(data)
            if raw.get("format") != FORMAT_VERSION:
                raise SnapshotError(
                    f"the snapshot is in format {raw.get('format')!r}; "
                    f"this Kiln reads format {FORMAT_VERSION}"
                )
            raw["runtime"] = Runtime(**raw["runtime"])
            raw["files"] = {name: FileEntry(**entry) for name, entry in raw["files"].items()}
            raw["imports"] = module_names(raw.get("imports", []))
            return cls(**raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise SnapshotError(f"the snapshot manifest is unreadable ({exc})") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def sign(manifest_bytes: bytes, signing_key: str) -> str:
    return hmac.new(signing_key.encode(), manifest_bytes, hashlib.sha256).hexdigest()


def verify_signature(manifest_bytes: bytes, signature: str, signing_key: str) -> None:
    expected = sign(manifest_bytes, signing_key)
    if not hmac.compare_digest(expected, signature.strip()):
        raise SnapshotTampered("the snapshot's manifest signature does not match; not loading it")

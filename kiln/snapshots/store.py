"""A node's snapshot cache: sealed, signed snapshot directories named by their key.

`seal` turns a baker's staging directory into a snapshot: it hashes every file, writes the
manifest and its signature, and renames the directory into place in one step, so a reader sees
a whole snapshot or none; a key already present is never sealed again. `open` checks the
signature, the key and every file's size (and, with `full=True`, every file's sha256, which is
what a copy fetched from a shared store gets) before anything is loaded.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import SnapshotError, SnapshotTampered
from kiln.snapshots.bake import BAKE_REPORT, GRAPH
from kiln.snapshots.manifest import (
    MANIFEST,
    SIGNATURE,
    FileEntry,
    Manifest,
    Runtime,
    sha256_file,
    sign,
    verify_signature,
)

__all__ = ["Snapshot", "SnapshotCache"]


@dataclass(frozen=True)
class Snapshot:
    directory: Path
    manifest: Manifest

    def file(self, name: str) -> Path:
        return self.directory / name


class SnapshotCache:
    def __init__(self, root: Path, signing_key: str) -> None:
        if len(signing_key) < 32:
            raise SnapshotError("the snapshot signing key must have at least 32 characters")
        self.root = root
        self.signing_key = signing_key

    def path(self, key: str) -> Path:
        if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            raise SnapshotError(f"{key!r} is not a snapshot key (64 hex digits)")
        return self.root / key

    def has(self, key: str) -> bool:
        return (self.path(key) / SIGNATURE).exists()

    def staging(self, key: str) -> Path:
        """A fresh, private directory for a baker to write into."""
        directory = self.root / ".staging" / f"{key}.{secrets.token_hex(4)}"
        directory.mkdir(parents=True, mode=0o700)
        return directory

    def seal(
        self, staging: Path, *, key: str, function: str, code_digest: str, runtime: Runtime
    ) -> Snapshot:
        """Hash, sign and move a baked staging directory into the cache as `key`."""
        target = self.path(key)
        if self.has(key):
            shutil.rmtree(staging, ignore_errors=True)
            return self.open(key)
        try:
            report = json.loads((staging / BAKE_REPORT).read_text())
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"the bake did not finish ({exc})") from None
        names = sorted(p.name for p in staging.iterdir() if p.is_file())
        if GRAPH not in names:
            raise SnapshotError("the bake wrote no object graph")
        files = {}
        for name in names:
            path = staging / name
            _fsync(path)  # what the signature vouches for is on disk before the rename
            files[name] = FileEntry(size=path.stat().st_size, sha256=sha256_file(path))
        manifest = Manifest(
            key=key,
            function=function,
            code_digest=code_digest,
            runtime=runtime,
            files=files,
            tensors=int(report["tensors"]),
            storages=int(report["storages"]),
            tensor_bytes=int(report["tensor_bytes"]),
            bake_seconds=float(report["seconds"]),
        )
        body = manifest.to_json()
        _write_synced(staging / MANIFEST, body)
        _write_synced(staging / SIGNATURE, sign(body, self.signing_key).encode())
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            staging.rename(target)
        except OSError:
            if not self.has(key):  # not a lost race: a real failure
                raise
            shutil.rmtree(staging, ignore_errors=True)
        _fsync(target.parent)
        return self.open(key)

    def open(self, key: str, *, full: bool = False) -> Snapshot:
        """The verified snapshot `key`; raises SnapshotError (SnapshotTampered when altered)."""
        directory = self.path(key)
        try:
            body = (directory / MANIFEST).read_bytes()
            signature = (directory / SIGNATURE).read_text()
        except FileNotFoundError:
            raise SnapshotError(f"no snapshot {key[:12]} in {self.root}") from None
        verify_signature(body, signature, self.signing_key)
        manifest = Manifest.from_json(body)
        if manifest.key != key:
            raise SnapshotTampered(f"the snapshot in {key[:12]} is signed for {manifest.key[:12]}")
        for name, entry in manifest.files.items():
            path = directory / name
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise SnapshotTampered(f"the snapshot lost its file {name}") from None
            if size != entry.size:
                raise SnapshotTampered(f"{name} has {size} bytes; the manifest says {entry.size}")
            if full and sha256_file(path) != entry.sha256:
                raise SnapshotTampered(f"{name} does not match its checksum")
        return Snapshot(directory, manifest)

    def discard(self, key: str) -> None:
        """Remove a snapshot that failed to restore, so it is baked again."""
        directory = self.path(key)
        if directory.exists():
            doomed = directory.with_name(f".{key}.discarded.{secrets.token_hex(4)}")
            directory.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""A node's snapshot cache: sealed, signed snapshot directories named by their key.

`seal` turns a baker's staging directory into a snapshot: it hashes every file, writes the
manifest and its signature, and renames the directory into place in one step, so a reader sees
a whole snapshot or none; a key already present is never sealed again. `adopt` does the same for
a copy fetched from the shared store, after checking its signature and every file's sha256.

Hashing gigabytes on every cold start would cost more than the restore, so `open` checks the
manifest's signature and a *stamp*: each file's inode, size and change times as sealed, signed
too. Any later write, truncation, replacement or chmod changes a file's ctime, which no one
can set back; a file whose stamp differs is hashed in full and refused if it changed. Sealed
files are read-only.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import SnapshotError, SnapshotTampered
from kiln.snapshots.manifest import (
    BAKE_REPORT,
    GRAPH,
    MANIFEST,
    SIGNATURE,
    FileEntry,
    Manifest,
    Runtime,
    sha256_file,
    sign,
    verify_signature,
)
from kiln.wire import affinity_id

__all__ = ["Snapshot", "SnapshotCache"]

STAMP = "stamp.json"  # local only: never uploaded, rewritten by each node that adopts a copy


@dataclass(frozen=True)
class Snapshot:
    directory: Path
    manifest: Manifest

    def file(self, name: str) -> Path:
        return self.directory / name

    @classmethod
    def at(cls, directory: Path) -> Snapshot:
        """A snapshot that the node agent has already verified, as a replica (which holds no
        signing key) opens it."""
        try:
            return cls(directory, Manifest.from_json((directory / MANIFEST).read_bytes()))
        except FileNotFoundError:
            raise SnapshotError(f"no snapshot in {directory}") from None


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

    def affinities(self, limit: int) -> list[str]:
        """`kiln.wire.affinity_id` of the sealed snapshots here, most recently sealed first (at
        most `limit`). Read from the manifests without verifying them: this only steers
        placement; every open still verifies."""
        found: list[tuple[int, str]] = []
        for directory in self.root.iterdir() if self.root.is_dir() else ():
            signature = directory / SIGNATURE
            try:
                sealed_at = signature.stat().st_mtime_ns
                raw = json.loads((directory / MANIFEST).read_bytes())
                found.append((sealed_at, affinity_id(raw["code_digest"], raw["function"])))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # staging, half-removed or foreign: not advertised
        found.sort(reverse=True)
        return list(dict.fromkeys(a for _, a in found))[:limit]

    def imports(self, key: str) -> tuple[str, ...] | None:
        """The modules snapshot `key`'s function needed, from its signed manifest (the files
        are not hashed: this only decides what standbys import); None when there is no such
        snapshot here or its manifest does not verify."""
        directory = self.path(key)
        try:
            body = (directory / MANIFEST).read_bytes()
            verify_signature(body, (directory / SIGNATURE).read_text(), self.signing_key)
            return Manifest.from_json(body).imports
        except (OSError, SnapshotError):
            return None

    def staging(self, key: str) -> Path:
        """A fresh, private directory for a baker to write into."""
        directory = self.root / ".staging" / f"{key}.{secrets.token_hex(4)}"
        directory.mkdir(parents=True, mode=0o700)
        return directory

    def seal(
        self,
        staging: Path,
        *,
        key: str,
        function: str,
        code_digest: str,
        runtime: Runtime,
        imports: tuple[str, ...] = (),
    ) -> Snapshot:
        """Hash, sign and move a baked staging directory into the cache as `key`; `imports`
        are the modules the function needed (checked names, see `kiln.snapshots.imports`)."""
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
            imports=imports,
        )
        body = manifest.to_json()
        _write_synced(staging / MANIFEST, body)
        _write_synced(staging / SIGNATURE, sign(body, self.signing_key).encode())
        return self._install(staging, key)

    def adopt(self, staging: Path, key: str) -> Snapshot:
        """Move a copy of snapshot `key` (fetched from the shared store into `staging`) into
        the cache once its signature and every file's sha256 check out; a copy that fails is
        deleted and SnapshotTampered raised."""
        try:
            body = (staging / MANIFEST).read_bytes()
            verify_signature(body, (staging / SIGNATURE).read_text(), self.signing_key)
            manifest = Manifest.from_json(body)
            if manifest.key != key:
                raise SnapshotTampered(f"the copy of {key[:12]} is signed for {manifest.key[:12]}")
            for name, entry in manifest.files.items():
                _check_file(staging / name, name, entry, full=True)
        except (OSError, SnapshotError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, SnapshotTampered):
                raise
            raise SnapshotTampered(
                f"the copy of snapshot {key[:12]} is incomplete ({exc})"
            ) from None
        for name in manifest.files:
            _fsync(staging / name)
        return self._install(staging, key)

    def _install(self, staging: Path, key: str) -> Snapshot:
        target = self.path(key)
        for path in staging.iterdir():
            path.chmod(0o444)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            staging.rename(target)
        except OSError:
            if not self.has(key):  # not a lost race: a real failure
                raise
            shutil.rmtree(staging, ignore_errors=True)
            return self.open(key)
        _fsync(target.parent)
        self._write_stamp(target)
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
        stamp = self._read_stamp(directory)
        restamp = False
        for name, entry in manifest.files.items():
            path = directory / name
            changed = stamp.get(name) != _stat_of(path)
            _check_file(path, name, entry, full=full or changed)
            restamp |= changed
        if restamp:  # touched (a chmod, a copy back) but every byte is as signed
            self._write_stamp(directory)
        return Snapshot(directory, manifest)

    def _stamp_mac(self, stats: dict[str, list[int] | None]) -> str:
        text = json.dumps(stats, sort_keys=True).encode()
        return hmac.new(self.signing_key.encode(), b"stamp:" + text, "sha256").hexdigest()

    def _write_stamp(self, directory: Path) -> None:
        names = [p.name for p in directory.iterdir() if p.name != STAMP]
        stats = {name: _stat_of(directory / name) for name in names}
        body = json.dumps({"stats": stats, "mac": self._stamp_mac(stats)})
        temp = directory.with_name(f".{directory.name}.{secrets.token_hex(4)}.stamp")
        temp.write_text(body)
        temp.replace(directory / STAMP)

    def _read_stamp(self, directory: Path) -> dict[str, list[int] | None]:
        """The sealed stats, or nothing (every file is then hashed) when the stamp is missing
        or was not written with this key."""
        try:
            data = json.loads((directory / STAMP).read_text())
            stats: dict[str, list[int] | None] = data["stats"]
            if hmac.compare_digest(self._stamp_mac(stats), str(data["mac"])):
                return stats
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return {}

    def discard(self, key: str) -> None:
        """Remove a snapshot that failed to restore, so it is baked again."""
        directory = self.path(key)
        if directory.exists():
            doomed = directory.with_name(f".{key}.discarded.{secrets.token_hex(4)}")
            directory.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def _stat_of(path: Path) -> list[int] | None:
    """What a stamp records of a file: any write changes it. Not the ctime: the node agent
    hard-links snapshot files into sandboxes, and every link and unlink changes it (a rehash of
    the whole snapshot on every cold start); a write that keeps the mtime takes a deliberate
    utime by someone who could also read the key that signs the stamp."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _check_file(path: Path, name: str, entry: FileEntry, *, full: bool) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise SnapshotTampered(f"the snapshot lost its file {name}") from None
    if size != entry.size:
        raise SnapshotTampered(f"{name} has {size} bytes; the manifest says {entry.size}")
    if full and sha256_file(path) != entry.sha256:
        raise SnapshotTampered(f"{name} does not match its checksum")


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

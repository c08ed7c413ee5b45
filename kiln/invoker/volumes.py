"""Pods' volumes on a node: a directory per pod under `$KILN_HOME/node/volumes/`, the home of
the pod's replicas, kept across its stops and starts until the pod is deleted.

Where the agent may mount file systems (it runs as root, with loop devices and `mkfs.ext4`), a
volume is an ext4 file system in a sparse image file of the pod's `volume_gb`, loop-mounted on
its directory: the size is enforced (a full volume says "No space left on device" to the
pod's programs, not to the node's), and the bytes it holds are only the ones written. Elsewhere
(an unprivileged `kiln dev`) the volume is a plain directory and its size is not enforced; the
agent says so once.

Mounts outlive the replicas (a pod starting again on the node finds its volume mounted) but
not the agent: `close` unmounts them, and the next start mounts the image again.

With a file:// or s3:// store, a stopped pod's volume is parked there (`park`): unmounted and
put as a sparse tar of its image (only the blocks written travel), so that the pod may start
on any node, which restores it (`restore`) before the pod starts there. The parking node keeps
its image as a cache, marked with the name of the copy it equals: a restore there of that same
copy downloads nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import uuid
from pathlib import Path

from kiln.blobs.base import BlobStore

__all__ = ["Volumes"]

_log = logging.getLogger("kiln.agent.volumes")
_GIB = 1024**3
_COMMAND_TIMEOUT_S = 60.0
_MOVE_TIMEOUT_S = 3600.0  # packing or unpacking a large volume


class Volumes:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._mounted: set[Path] = set()
        self._refusal: str | None = None  # why sizes are not enforced here, once known
        # One change at a time per pod (two starts of a pod cannot race, nor a start and its
        # parking); the work is blocking file system calls and commands, done in a thread.
        self._locks: dict[str, asyncio.Lock] = {}
        # The replicas using each pod's volume here: it is not parked, restored or dropped
        # under them (a start still being set up counts from its `prepare`).
        self._holders: dict[str, set[str]] = {}

    def path(self, pod_id: str) -> Path:
        return self.root / str(uuid.UUID(pod_id))

    def _image(self, pod_id: str) -> Path:
        return self.root / f"{uuid.UUID(pod_id)}.img"

    def _marker(self, pod_id: str) -> Path:
        """Names the parked copy this node's volume equals, if it does."""
        return self.root / f"{uuid.UUID(pod_id)}.parked"

    def _lock(self, pod_id: str) -> asyncio.Lock:
        return self._locks.setdefault(str(uuid.UUID(pod_id)), asyncio.Lock())

    async def prepare(self, pod_id: str, gb: int, uid: int | None, *, holder: str) -> Path:
        """The pod's volume, mounted (made at its first start), everything in it owned by `uid`
        (each replica runs as a uid of its own; None: the agent's, unsandboxed), held by the
        replica `holder` until `release`."""
        async with self._lock(pod_id):
            self._holders.setdefault(self._key(pod_id), set()).add(holder)
            try:
                return await asyncio.to_thread(self._prepare, pod_id, gb, uid)
            except BaseException:
                self.release(pod_id, holder)
                raise

    def release(self, pod_id: str, holder: str) -> None:
        """The replica `holder` no longer uses the volume (it exited, or never started)."""
        held = self._holders.get(self._key(pod_id))
        if held is not None:
            held.discard(holder)

    def busy(self, pod_id: str) -> bool:
        """A move or a drop of the volume is under way here."""
        return self._lock(pod_id).locked()

    def _key(self, pod_id: str) -> str:
        return str(uuid.UUID(pod_id))

    def _unheld(self, pod_id: str, what: str) -> None:
        if self._holders.get(self._key(pod_id)):
            raise RuntimeError(f"the volume of pod {pod_id} is in use here: not {what}")

    async def restore(self, pod_id: str, blob: str, store: BlobStore) -> None:
        """This node's copy of the pod's volume made the parked copy `blob` (nothing to do
        when it is that copy already)."""
        async with self._lock(pod_id):
            self._unheld(pod_id, "restored")
            await self._restore(pod_id, blob, store)

    async def park(self, pod_id: str, blob: str, store: BlobStore) -> None:
        """Put a copy of the stopped pod's volume in `store` as `blob`; this node keeps its own
        as a cache of that copy. Raises if the volume is not here."""
        async with self._lock(pod_id):
            self._unheld(pod_id, "parked")
            archive = self.root / f".{uuid.UUID(pod_id)}.{uuid.uuid4().hex}.tar"
            try:
                await asyncio.to_thread(self._pack, pod_id, archive)
                await store.put_file(blob, archive)
            finally:
                await asyncio.to_thread(archive.unlink, True)
            await asyncio.to_thread(self._marker(pod_id).write_text, blob)

    async def drop(self, pod_id: str) -> None:
        """An ended pod's volume goes, bytes and all."""
        async with self._lock(pod_id):
            self._unheld(pod_id, "dropped")
            await asyncio.to_thread(self._drop, pod_id)

    async def close(self) -> None:
        """Unmount every volume this agent mounted (their replicas are gone with it)."""
        for path in list(self._mounted):
            async with self._lock(path.name):
                await asyncio.to_thread(self._unmount, path)

    async def _restore(self, pod_id: str, blob: str, store: BlobStore) -> None:
        marker = self._marker(pod_id)
        if await asyncio.to_thread(self._cached, pod_id, blob):
            return  # this node's copy is that one
        archive = self.root / f".{uuid.UUID(pod_id)}.{uuid.uuid4().hex}.tar"
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        try:
            await store.get_into(blob, archive)
            await asyncio.to_thread(self._unpack, pod_id, archive)
        finally:
            await asyncio.to_thread(archive.unlink, True)
        await asyncio.to_thread(marker.write_text, blob)

    def _cached(self, pod_id: str, blob: str) -> bool:
        """This node holds the parked copy `blob` as it was parked: marked so, and there."""
        there = self._image(pod_id).exists() or self.path(pod_id).is_dir()
        return there and _read(self._marker(pod_id)) == blob

    def _pack(self, pod_id: str, archive: Path) -> None:
        path, image = self.path(pod_id), self._image(pod_id)
        if image.exists():
            self._unmount(path)  # a consistent image: nothing writes to it while it is read
            # A mount elsewhere (a container's mount namespace) keeps the file system, and its
            # loop device, alive after ours is gone: then it may still change.
            if _run(["losetup", "--associated", str(image)], want_output=True):
                raise OSError(f"the volume of pod {pod_id} is still mounted somewhere")
            member = image.name
        elif path.is_dir():
            member = path.name
        else:
            raise FileNotFoundError(f"pod {pod_id} has no volume on this node")
        failed = _run(
            ["tar", "--sparse", "-cf", str(archive), "-C", str(self.root), member],
            within_s=_MOVE_TIMEOUT_S,
        )
        if failed:
            raise OSError(f"the volume of pod {pod_id} could not be packed: {failed}")

    def _unpack(self, pod_id: str, archive: Path) -> None:
        """This node's copy replaced by the archive's (an image, or a plain directory)."""
        self._drop(pod_id)
        failed = _run(["tar", "-xf", str(archive), "-C", str(self.root)], within_s=_MOVE_TIMEOUT_S)
        if failed:
            raise OSError(f"the parked volume of pod {pod_id} could not be unpacked: {failed}")

    def _prepare(self, pod_id: str, gb: int, uid: int | None) -> Path:
        path, image = self.path(pod_id), self._image(pod_id)
        # Once a replica uses it, this copy is no longer the parked one it may have been.
        self._marker(pod_id).unlink(missing_ok=True)
        path.mkdir(parents=True, exist_ok=True)
        if path.is_mount():
            self._mounted.add(path)  # mounted by this agent's predecessor
        elif image.exists() or (self._enforceable() and not _has_files(path)):
            self._mount(image, path, gb)
        if uid is not None:
            _chown_tree(path, uid)
        return path

    def _drop(self, pod_id: str) -> None:
        path = self.path(pod_id)
        self._unmount(path)
        shutil.rmtree(path, ignore_errors=True)
        self._image(pod_id).unlink(missing_ok=True)
        self._marker(pod_id).unlink(missing_ok=True)

    def _enforceable(self) -> bool:
        if self._refusal is None:
            missing = [tool for tool in ("mkfs.ext4", "mount", "umount") if not shutil.which(tool)]
            if os.geteuid() != 0:
                self._refusal = "the node agent is not root"
            elif missing:
                self._refusal = f"{', '.join(missing)} not found (apt-get install e2fsprogs mount)"
            elif not Path("/dev/loop-control").exists():
                self._refusal = "this host has no loop devices"
            else:
                self._refusal = ""
            if self._refusal:
                _log.warning("pods' volume sizes are not enforced on this node: %s", self._refusal)
        return not self._refusal

    def _mount(self, image: Path, path: Path, gb: int) -> None:
        made = not image.exists()
        if made:
            with open(image, "wb") as sparse:  # no bytes written: one hole of the whole size
                sparse.truncate(max(1, gb) * _GIB)
            # No blocks reserved for root (the pod's programs are not root), and the inode
            # tables initialised lazily by the kernel: making 100 GB takes as long as 1 GB.
            lazily = "lazy_itable_init=1,lazy_journal_init=1"
            failed = _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", lazily, str(image)])
            if failed:
                image.unlink(missing_ok=True)
                self._give_up(f"mkfs.ext4 failed: {failed}")
                return
        failed = _run(["mount", "-o", "loop,nosuid,nodev", str(image), str(path)])
        if failed:
            if not made:  # its bytes are in there: never start it on an empty directory
                raise OSError(f"the volume {image.name} cannot be mounted: {failed}")
            image.unlink(missing_ok=True)
            self._give_up(f"mount failed: {failed}")
            return
        self._mounted.add(path)
        if made:
            _clear_lost_found(path)

    def _give_up(self, why: str) -> None:
        self._refusal = why
        _log.warning("pods' volume sizes are not enforced on this node: %s", why)

    def _unmount(self, path: Path) -> None:
        if path.is_mount():
            failed = _run(["umount", str(path)])
            if failed:  # something still holds it open: detach it now, freed when let go
                _log.warning("volume %s busy (%s): detached lazily", path.name, failed)
                _run(["umount", "-l", str(path)])
        self._mounted.discard(path)


def _run(
    argv: list[str], *, within_s: float = _COMMAND_TIMEOUT_S, want_output: bool = False
) -> str:
    """Run a system command; its error ("" if it succeeded), or with `want_output` what it
    printed (an error raises)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=within_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        if want_output:
            raise OSError(f"{argv[0]}: {exc}") from None
        return str(exc) or type(exc).__name__
    if want_output:
        if done.returncode != 0:
            raise OSError(f"{argv[0]}: {done.stderr.strip() or done.returncode}")
        return done.stdout.strip()
    return "" if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _has_files(path: Path) -> bool:
    """A volume made as a plain directory before sizes were enforced keeps being one."""
    return any(path.iterdir())


def _clear_lost_found(path: Path) -> None:
    """ext4's `lost+found` is root's and of no use to a pod's programs; a fresh volume is
    empty, as a directory volume is."""
    lost = path / "lost+found"
    if lost.is_dir() and not any(lost.iterdir()):
        lost.rmdir()


def _chown_tree(root: Path, uid: int) -> None:
    """`root` and everything in it owned by `uid` (a pod's new replica has a new uid)."""
    os.chown(root, uid, uid)
    for parent, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.lchown(os.path.join(parent, name), uid, uid)

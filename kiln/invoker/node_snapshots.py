"""The node agent's half of snapshots: the node's cache, the shared store, bake leases, and the
requests its replicas make while they start (on `ns.node.<node>.snapshots`).

A starting replica asks to `open` its snapshot. The agent answers with the path of a verified
copy in its cache (fetching it from the shared store first when another node baked it), or,
when there is none, with a private staging directory to `bake` into — but only to the one
replica holding the cluster-wide lease for that key, so a snapshot is baked once. The baker
then asks the agent to `seal` (hash, sign, move into the cache, upload to the shared store).
A replica whose restore failed says so (`failed`): the snapshot is discarded here and in the
shared store, and that replica may bake it again. A state that cannot be captured (`abandon`)
is not tried again on this node until the agent restarts.

The agent holds the signing key; replicas never do. It imports no torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from kiln.errors import SnapshotError
from kiln.invoker.credentials import replica_inbox
from kiln.invoker.sandbox import Box, link_tree
from kiln.seal import Seals
from kiln.settings import Settings, Switch
from kiln.snapshots.imports import module_names
from kiln.snapshots.manifest import Manifest, Runtime, snapshot_key
from kiln.snapshots.shared import shared_snapshots
from kiln.snapshots.store import Snapshot, SnapshotCache
from kiln.wire import MAX_ADVERTISED_SNAPSHOTS, StartReplica, Subjects

__all__ = ["NodeSnapshots"]

_log = logging.getLogger("kiln.agent")


class NodeSnapshots:
    def __init__(
        self,
        settings: Settings,
        nc: NATS,
        node_id: str,
        launch_of: Callable[[str], StartReplica | None],
        *,
        on_manifest: Callable[[Manifest], None] = lambda manifest: None,
        box_of: Callable[[str], Box | None] = lambda replica_id: None,
    ) -> None:
        """`on_manifest` hears of every snapshot sealed, opened or fetched here (what its
        function needs imported is in its manifest); `box_of` is a replica's sandbox, where it
        is shown its snapshot and bakes (it sees nothing else of the node)."""
        self.nc = nc
        self.node_id = node_id
        self.subjects = Subjects(settings.namespace)
        self.launch_of = launch_of
        self.on_manifest = on_manifest
        self.box_of = box_of
        self.cache = SnapshotCache(
            settings.home / "snapshots", settings.require("snapshot_signing_key")
        )
        self.seals = Seals(settings.snapshot_signing_key)
        self.shared = shared_snapshots(settings, nc.jetstream())
        self.runtime = Runtime.current()
        self._fetches: dict[str, asyncio.Task[Snapshot | None]] = {}
        self._bakes: dict[str, tuple[str, Path]] = {}  # replica id -> (key, staging)
        self._unbakeable: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sub: Subscription | None = None
        self._listed_at = -1
        self._affinities: list[str] = []

    @staticmethod
    def enabled(settings: Settings) -> bool:
        if settings.snapshots is Switch.OFF:
            return False
        if settings.snapshot_signing_key is None:
            _log.warning("KILN_SNAPSHOT_SIGNING_KEY is not set: snapshots are off on this node")
            return False
        return True

    def key_for(self, launch: StartReplica) -> str | None:
        """The snapshot key of a class's replica; None when it does not snapshot."""
        spec = launch.spec
        if spec.get("kind") != "class" or spec["resources"].get("snapshot", "shared") == "off":
            return None
        device = "cpu" if launch.gpu_type == "none" else "cuda"
        return snapshot_key(launch.artifact_digest, launch.function, self.runtime, device)

    def affinities(self) -> list[str]:
        """`affinity_id`s of the snapshots cached here, most recent first, for the heartbeat.
        The cache directory is read again only when it changed (a seal, fetch or discard
        renames an entry in it)."""
        try:
            changed = self.cache.root.stat().st_mtime_ns
        except FileNotFoundError:
            return []
        if changed != self._listed_at:
            self._listed_at = changed
            self._affinities = self.cache.affinities(MAX_ADVERTISED_SNAPSHOTS)
        return self._affinities

    def prefetch(self, key: str) -> None:
        """Start fetching `key` from the shared store while the replica starts, if the node
        does not have it."""
        if not self.cache.has(key):
            self._fetch(key)

    async def start(self) -> None:
        subject = self.subjects.all_snapshot_requests(self.node_id)
        self._sub = await self.nc.subscribe(subject, cb=self._on_request)

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        for replica_id in list(self._bakes):
            self.forget(replica_id)
        if self._tasks:  # uploads and lease releases in progress get a moment to finish
            _, late = await asyncio.wait(set(self._tasks), timeout=10)
            for task in late:
                task.cancel()

    def forget(self, replica_id: str) -> None:
        """The replica exited: a bake it never had sealed is dropped and its lease freed."""
        bake = self._bakes.pop(replica_id, None)
        if bake is not None:
            key, staging = bake
            shutil.rmtree(staging, ignore_errors=True)
            self._spawn(self.shared.release(key))

    # Requests ----------------------------------------------------------------------------------

    async def _on_request(self, msg: Msg) -> None:
        # Opening may wait for a fetch: never hold up the requests behind this one.
        self._spawn(self._answer(msg))

    async def _answer(self, msg: Msg) -> None:
        try:
            request = json.loads(msg.data)
            # Who asks is the subject's last token, which only that replica may publish to
            # (the replica id in the body is the replica's word).
            replica_id = str(uuid.UUID(msg.subject.rsplit(".", 1)[-1]))
            launch = self.launch_of(replica_id)
            if launch is None or launch.snapshot_key is None:
                raise SnapshotError(f"replica {replica_id} has no snapshot on this node")
            if not self.seals.function_sent(
                msg, uuid.UUID(launch.function_id), "a snapshot request"
            ):
                return
            key = launch.snapshot_key
            op = request.get("op")
            if op == "open":
                answer = await self._open(replica_id, key)
            elif op == "failed":
                answer = await self._failed(replica_id, key, str(request.get("error", "")))
            elif op == "seal":
                imports = module_names(request.get("imports", []))
                answer = await self._seal(replica_id, launch, imports)
            elif op == "abandon":
                answer = self._abandon(replica_id, str(request.get("error", "")))
            else:
                answer = {"error": f"unknown snapshot request {op!r}"}
        except Exception as exc:  # noqa: BLE001 - a bad request must not hurt the agent
            _log.warning("snapshot request failed: %s", exc)
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        # Only to the asking replica's own inboxes, or to a reply subject the server mapped
        # back into its function's account ("_R_."): the agent may publish anywhere in the Kiln
        # account, and a reply subject is the asker's to choose (it could name the JetStream API).
        try:
            inbox = replica_inbox(uuid.UUID(hex=msg.subject.rsplit(".", 1)[-1])) + "."
        except ValueError:
            return
        if msg.reply and msg.reply.startswith((inbox, "_R_.")):
            with contextlib.suppress(Exception):
                await self.nc.publish(msg.reply, json.dumps(answer).encode())

    async def _open(self, replica_id: str, key: str) -> dict[str, Any]:
        fallback = None
        if self.cache.has(key):
            try:
                snapshot = await asyncio.to_thread(self.cache.open, key)
                self.on_manifest(snapshot.manifest)
                return {"path": str(await self._shown(replica_id, snapshot))}
            except SnapshotError as exc:
                fallback = f"{exc.code}: {exc.message}"
                _log.error(
                    "snapshot %s on this node is unusable (%s); discarding it", key[:12], exc
                )
                await asyncio.to_thread(self.cache.discard, key)
        try:
            fetched = await self._fetch(key)
        except SnapshotError as exc:
            fallback = f"{exc.code}: {exc.message}"
            _log.error(
                "the shared copy of snapshot %s is unusable (%s); deleting it", key[:12], exc
            )
            await self._delete_shared(key)
            fetched = None
        if fetched is not None:
            self.on_manifest(fetched.manifest)
            return {"path": str(await self._shown(replica_id, fetched))}
        answer = await self._grant_bake(replica_id, key)
        if fallback is not None:
            answer["fallback"] = fallback
        return answer

    async def _failed(self, replica_id: str, key: str, error: str) -> dict[str, Any]:
        _log.error(
            "replica %s could not restore snapshot %s (%s); discarding it for a re-bake",
            replica_id, key[:12], error,
        )  # fmt: skip
        await asyncio.to_thread(self.cache.discard, key)
        await self._delete_shared(key)
        return await self._grant_bake(replica_id, key)

    async def _grant_bake(self, replica_id: str, key: str) -> dict[str, Any]:
        if key in self._unbakeable or replica_id in self._bakes:
            return {}
        if not await self.shared.lease(key, f"{self.node_id}/{replica_id}"):
            return {}  # another replica is baking it; this one runs its hooks
        box = self.box_of(replica_id)
        if box is None:
            staging = self.cache.staging(key)
        else:  # in its own writable directory; moved out of its reach before it is sealed
            staging = box.work / f"bake-{key}"
            staging.mkdir(mode=0o700)
            os.chown(staging, box.uid, box.uid)
        self._bakes[replica_id] = (key, staging)
        return {"bake": str(staging)}

    async def _shown(self, replica_id: str, snapshot: Snapshot) -> Path:
        """Where the replica finds the snapshot: in the cache, or, sandboxed, as hard links in
        its box's read-only directory (the cache itself is out of its sight)."""
        box = self.box_of(replica_id)
        if box is None:
            return snapshot.directory
        shown = box.ro / "snapshots" / snapshot.directory.name
        if not shown.exists():
            await asyncio.to_thread(link_tree, snapshot.directory, shown)
        return shown

    async def _seal(
        self, replica_id: str, launch: StartReplica, imports: tuple[str, ...]
    ) -> dict[str, Any]:
        bake = self._bakes.pop(replica_id, None)
        if bake is None:
            return {"error": "this replica was given no bake to seal"}
        key, staging = bake
        try:
            if self.box_of(replica_id) is not None:
                # Out of the sandbox first: what is hashed and signed can no longer be changed
                # through its path (checksums guard what an open descriptor might still write).
                source, staging = staging, self.cache.staging(key)
                await asyncio.to_thread(_take_over, source, staging)
            snapshot = await asyncio.to_thread(
                self.cache.seal,
                staging,
                key=key,
                function=f"{launch.app}/{launch.function}",
                code_digest=launch.artifact_digest,
                runtime=self.runtime,
                imports=imports,
            )
        except (OSError, SnapshotError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            self._spawn(self.shared.release(key))
            return {"error": f"sealing failed: {exc}"}
        manifest = snapshot.manifest
        _log.info(
            "sealed snapshot %s of %s: %d tensors, %.1f MiB, baked in %.2f s",
            key[:12], manifest.function, manifest.tensors, manifest.tensor_bytes / 2**20,
            manifest.bake_seconds,
        )  # fmt: skip
        self.on_manifest(manifest)
        self._spawn(self._publish(snapshot))
        return {"ok": True, "key": key}

    def _abandon(self, replica_id: str, error: str) -> dict[str, Any]:
        bake = self._bakes.get(replica_id)
        if bake is not None:
            self._unbakeable.add(bake[0])
            _log.warning("snapshot %s cannot be baked: %s", bake[0][:12], error)
        self.forget(replica_id)
        return {"ok": True}

    # Shared store ------------------------------------------------------------------------------

    def _fetch(self, key: str) -> asyncio.Task[Snapshot | None]:
        """One fetch per key at a time, shared by every replica that waits for it."""
        task = self._fetches.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch_once(key), name=f"kiln-snapshot-fetch-{key[:8]}")
            self._fetches[key] = task
            task.add_done_callback(lambda _: self._fetches.pop(key, None))
            # A prefetch nobody waits for (its replica died) must not log an unread error.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def _fetch_once(self, key: str) -> Snapshot | None:
        if self.cache.has(key):
            return await asyncio.to_thread(self.cache.open, key)
        try:
            return await self.shared.fetch(key, self.cache)
        except SnapshotError:
            raise
        except Exception as exc:  # noqa: BLE001 - an unreachable store is a miss, not a failure
            _log.warning("fetching snapshot %s from the shared store failed: %s", key[:12], exc)
            return None

    async def _publish(self, snapshot: Snapshot) -> None:
        key = snapshot.manifest.key
        try:
            await self.shared.upload(snapshot)
        except Exception as exc:  # noqa: BLE001 - the local copy serves this node regardless
            _log.warning("uploading snapshot %s to the shared store failed: %s", key[:12], exc)
        finally:
            await self.shared.release(key)

    async def _delete_shared(self, key: str) -> None:
        try:
            await self.shared.delete(key)
        except Exception as exc:  # noqa: BLE001 - it is refused on fetch anyway
            _log.warning("deleting snapshot %s from the shared store failed: %s", key[:12], exc)

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _take_over(staging: Path, target: Path) -> None:
    """Move a sandbox's bake into the agent's `target` (made empty), owned by the agent. Only
    plain files of one link are taken: a symbolic link (or a hard link) planted by the bake
    would have the agent read, sign and share a file of the host's."""
    target.rmdir()
    staging.rename(target)
    for path in target.iterdir():
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise SnapshotError(f"the bake left {path.name!r}, which is not a plain file")
    for path in (target, *target.iterdir()):
        os.chown(path, os.getuid(), os.getgid(), follow_symlinks=False)
        path.chmod(0o700 if path.is_dir() else 0o644)

"""The shared snapshot store: every node's sealed snapshots, in the JetStream object store, so a
snapshot baked on one node is fetched (not baked again) by the others.

A snapshot is stored as one object per file, `KEY/NAME`; the signature goes up after the data
files and the manifest last, so a manifest in the store means the whole snapshot is there.
Fetching writes into a private staging directory of the node's cache, which verifies the
signature and every file's sha256 before moving it into place (`SnapshotCache.adopt`).

Bakes are leased in a JetStream key-value bucket (create-if-absent, expiring), so a snapshot is
baked once across the cluster even when several replicas of a function start together.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from nats.js import JetStreamContext
from nats.js.errors import (
    KeyWrongLastSequenceError,
    NotFoundError,
    ObjectNotFoundError,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from kiln.snapshots.manifest import BAKE_REPORT, GRAPH, MANIFEST, SIGNATURE, Manifest, blob_name
from kiln.snapshots.store import Snapshot, SnapshotCache
from kiln.streams import SNAPSHOT_BAKES, SNAPSHOTS, key_value, object_store

__all__ = ["SharedSnapshots"]

_log = logging.getLogger(__name__)


class SharedSnapshots:
    def __init__(
        self, js: JetStreamContext, bucket: str, lease_bucket: str, *, replicas: int
    ) -> None:
        self.js = js
        self.replicas = replicas
        self.bucket = bucket
        self.lease_bucket = lease_bucket
        self._store: ObjectStore | None = None
        self._leases: KeyValue | None = None

    async def _objects(self) -> ObjectStore:
        if self._store is None:
            self._store = await object_store(
                self.js, SNAPSHOTS, self.bucket, replicas=self.replicas
            )
        return self._store

    async def _lease_kv(self) -> KeyValue:
        if self._leases is None:
            self._leases = await key_value(
                self.js, SNAPSHOT_BAKES, self.lease_bucket, replicas=self.replicas
            )
        return self._leases

    # Bake leases -------------------------------------------------------------------------------

    async def lease(self, key: str, holder: str) -> bool:
        """Take the right to bake `key`; False when someone else holds it."""
        kv = await self._lease_kv()
        try:
            await kv.create(key, holder.encode())
        except KeyWrongLastSequenceError:
            return False
        return True

    async def release(self, key: str) -> None:
        kv = await self._lease_kv()
        with contextlib.suppress(NotFoundError):
            await kv.purge(key)

    # Snapshots ---------------------------------------------------------------------------------

    async def has(self, key: str) -> bool:
        store = await self._objects()
        try:
            await store.get_info(f"{key}/{MANIFEST}")
        except (ObjectNotFoundError, NotFoundError):
            return False
        return True

    async def upload(self, snapshot: Snapshot) -> None:
        store = await self._objects()
        key = snapshot.manifest.key
        names = [*sorted(snapshot.manifest.files), SIGNATURE, MANIFEST]  # the manifest last
        for name in names:
            with snapshot.file(name).open("rb") as f:
                await store.put(f"{key}/{name}", f)

    async def fetch(self, key: str, cache: SnapshotCache) -> Snapshot | None:
        """Copy snapshot `key` into the node's cache; None when the store does not have it.
        Raises SnapshotTampered when the copy fails verification (it is then not kept)."""
        if not await self.has(key):
            return None
        store = await self._objects()
        staging = cache.staging(key)
        await _get_into(store, f"{key}/{MANIFEST}", staging / MANIFEST)
        await _get_into(store, f"{key}/{SIGNATURE}", staging / SIGNATURE)
        manifest = Manifest.from_json((staging / MANIFEST).read_bytes())
        for name in manifest.files:
            await _get_into(store, f"{key}/{name}", staging / name)
        return cache.adopt(staging, key)

    async def delete(self, key: str) -> None:
        """Remove a snapshot (the manifest first, so no one starts fetching a half-deleted
        one)."""
        store = await self._objects()
        names = [MANIFEST, SIGNATURE, GRAPH, BAKE_REPORT, blob_name("cpu"), blob_name("cuda")]
        for name in names:
            with contextlib.suppress(ObjectNotFoundError, NotFoundError):
                await store.delete(f"{key}/{name}")


async def _get_into(store: ObjectStore, name: str, path: Path) -> None:
    with path.open("wb") as f:
        await store.get(name, writeinto=f)

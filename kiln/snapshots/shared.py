"""The shared snapshot store: every node's sealed snapshots, in the blob store `KILN_STORE_URL`
names (JetStream's object store, a shared directory or S3), so a snapshot baked on one node is
fetched (not baked again) by the others.

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
import shutil

from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from kiln.blobs import Area, BlobStore, open_blob_store
from kiln.errors import SnapshotTampered
from kiln.settings import Settings
from kiln.snapshots.manifest import BAKE_REPORT, GRAPH, MANIFEST, SIGNATURE, Manifest, blob_name
from kiln.snapshots.store import Snapshot, SnapshotCache
from kiln.streams import SNAPSHOT_BAKES, key_value
from kiln.wire import Subjects

__all__ = ["SharedSnapshots", "shared_snapshots"]

_log = logging.getLogger(__name__)


def shared_snapshots(settings: Settings, js: JetStreamContext) -> SharedSnapshots:
    """The snapshot area of the store `KILN_STORE_URL` names, with NATS's bake leases."""
    return SharedSnapshots(
        open_blob_store(settings, Area.SNAPSHOTS, js), js,
        Subjects(settings.namespace).snapshot_leases, replicas=settings.stream_replicas,
    )  # fmt: skip


class SharedSnapshots:
    def __init__(
        self, blobs: BlobStore, js: JetStreamContext, lease_bucket: str, *, replicas: int
    ) -> None:
        self.blobs = blobs
        self.js = js
        self.replicas = replicas
        self.lease_bucket = lease_bucket
        self._leases: KeyValue | None = None

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
        return await self.blobs.has(f"{key}/{MANIFEST}")

    async def upload(self, snapshot: Snapshot) -> None:
        key = snapshot.manifest.key
        names = [*sorted(snapshot.manifest.files), SIGNATURE, MANIFEST]  # the manifest last
        for name in names:
            await self.blobs.put_file(f"{key}/{name}", snapshot.file(name))

    async def fetch(self, key: str, cache: SnapshotCache) -> Snapshot | None:
        """Copy snapshot `key` into the node's cache; None when the store does not have it.
        Raises SnapshotTampered when the copy fails verification (it is then not kept)."""
        if not await self.has(key):
            return None
        staging = cache.staging(key)
        try:
            await self.blobs.get_into(f"{key}/{MANIFEST}", staging / MANIFEST)
            await self.blobs.get_into(f"{key}/{SIGNATURE}", staging / SIGNATURE)
            manifest = Manifest.from_json((staging / MANIFEST).read_bytes())
            # The manifest is not yet verified (adopting it is): a name must stay in staging.
            for name in manifest.files:
                if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
                    raise SnapshotTampered(f"snapshot {key} names a file {name!r}")
            for name in manifest.files:
                await self.blobs.get_into(f"{key}/{name}", staging / name)
            return cache.adopt(staging, key)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # gigabytes, perhaps: never left behind
            raise

    async def delete(self, key: str) -> None:
        """Remove a snapshot (the manifest first, so no one starts fetching a half-deleted
        one)."""
        names = [MANIFEST, SIGNATURE, GRAPH, BAKE_REPORT, blob_name("cpu"), blob_name("cuda")]
        for name in names:
            await self.blobs.delete(f"{key}/{name}")

"""`KILN_STORE_URL` read, and the store it names opened for one area."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln._store_urls import StoreUrl, parse_store_url
from kiln.blobs.base import Area, BlobStore

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from kiln.settings import Settings

__all__ = ["StoreUrl", "open_blob_store", "parks_volumes", "parse_store_url"]


def parks_volumes(settings: Settings) -> bool:
    """Whether stopped pods' volumes go to the store (so that they may start on another node):
    with a file:// or s3:// store, not NATS's (its object store is sized for code and
    snapshots, not for disks)."""
    return parse_store_url(settings.store_url).scheme in ("file", "s3")


def open_blob_store(settings: Settings, area: Area, js: JetStreamContext | None) -> BlobStore:
    """The area of the store `KILN_STORE_URL` names; `js` serves `nats://`."""
    url = parse_store_url(settings.store_url)
    if url.scheme == "file":
        from kiln.blobs.file_blobs import FileBlobs

        assert url.path is not None
        return FileBlobs(url.path / area.value)
    if url.scheme == "s3":
        try:
            from kiln.blobs.s3_blobs import S3Blobs
        except ImportError:  # boto3 is the `aws` extra's
            raise RuntimeError(
                "KILN_STORE_URL names S3, which needs boto3: pip install 'kiln[aws]'"
            ) from None
        return S3Blobs(url.bucket, url.prefix, area, endpoint_url=settings.s3_endpoint_url)
    from kiln import streams
    from kiln.blobs.nats_blobs import NatsBlobs
    from kiln.wire import Subjects

    if area is Area.VOLUMES:
        raise ValueError("pods' volumes are parked only in a file:// or s3:// store")
    assert js is not None, "the nats:// store needs a JetStream context"
    subjects = Subjects(settings.namespace)
    if area is Area.CODE:
        return NatsBlobs(js, streams.CODE, subjects.code_bucket, replicas=settings.stream_replicas)
    return NatsBlobs(
        js, streams.SNAPSHOTS, subjects.snapshot_bucket, replicas=settings.stream_replicas
    )

"""`KILN_STORE_URL` read, and the store it names opened for one area."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from kiln.blobs.base import Area, BlobStore

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from kiln.settings import Settings

__all__ = ["StoreUrl", "open_blob_store", "parse_store_url"]

# S3's bucket names: 3 to 63 lowercase letters, digits, dots and hyphens.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_EXAMPLES = "nats://, file:///var/lib/kiln/store or s3://my-bucket/kiln"


@dataclass(frozen=True)
class StoreUrl:
    scheme: str  # nats, file or s3
    path: Path | None = None  # file://
    bucket: str = ""  # s3://
    prefix: str = ""


def parse_store_url(raw: str) -> StoreUrl:
    """`raw` as a store, or ValueError saying what is allowed."""
    split = urlsplit(raw.strip())
    if split.scheme == "nats" and not split.netloc and split.path in ("", "/"):
        return StoreUrl("nats")
    if split.scheme == "file" and not split.netloc and split.path.startswith("/"):
        return StoreUrl("file", path=Path(unquote(split.path)))
    if split.scheme == "s3":
        if not _BUCKET.match(split.netloc or ""):
            raise ValueError(
                f"s3://{split.netloc}: a bucket name is 3 to 63 lowercase letters, digits, dots "
                "and hyphens, such as s3://my-bucket/kiln"
            )
        return StoreUrl("s3", bucket=split.netloc, prefix=unquote(split.path).strip("/"))
    raise ValueError(f"expected {_EXAMPLES}")


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

    assert js is not None, "the nats:// store needs a JetStream context"
    subjects = Subjects(settings.namespace)
    if area is Area.CODE:
        return NatsBlobs(js, streams.CODE, subjects.code_bucket, replicas=settings.stream_replicas)
    return NatsBlobs(
        js, streams.SNAPSHOTS, subjects.snapshot_bucket, replicas=settings.stream_replicas
    )

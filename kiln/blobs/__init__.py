"""Where code artifacts and snapshots live: the store `KILN_STORE_URL` names.

- `nats://` (the default): JetStream's object store, beside everything else in NATS; right for
  `kiln dev` and small clusters.
- `file:///path`: a directory every process can reach (a shared volume).
- `s3://bucket/prefix`: S3, or an S3-compatible service at `KILN_S3_ENDPOINT_URL`; right for
  models of tens of gigabytes. Credentials come the standard AWS ways (environment, profile,
  the instance's role); reads of large objects are ranged and parallel, writes multipart.

Each store holds two areas, `code` (packaged app sources, by sha256) and `snapshots`
(`KEY/FILE`). What comes out of a store is verified by whoever reads it (sha256 of code, the
signature and sha256 of every snapshot file), never trusted for having been there.
"""

from __future__ import annotations

from kiln.blobs.base import Area, BlobMissing, BlobStore
from kiln.blobs.opening import open_blob_store, parks_volumes, parse_store_url

__all__ = [
    "Area",
    "BlobMissing",
    "BlobStore",
    "open_blob_store",
    "parks_volumes",
    "parse_store_url",
]

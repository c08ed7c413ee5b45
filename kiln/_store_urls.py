"""`KILN_STORE_URL` read: which store holds code and snapshots (`kiln.blobs` opens it). Only
the standard library here: the settings parse it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

__all__ = ["StoreUrl", "parse_store_url"]

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

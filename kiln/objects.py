"""Objects of a JetStream object store bucket, in nats-py's layout, written and read through the
stream's own subjects and direct gets only.

A replica's NATS user belongs to an account of its function's own, which reaches the Kiln
account's JetStream through imports (kiln.invoker.credentials). Imports carry what goes to a
stream's subjects, pull requests, acks and direct gets; they do not carry the JetStream API
(`STREAM.INFO`, `STREAM.MSG.GET`, `STREAM.PURGE`), which the server answers for the requesting
account, and a function account has no JetStream. nats-py's ObjectStore uses that API to open a
bucket, to look an object up and to clean up after it, and reads through a consumer; these
functions do without, and platform processes use them too, so both sides share one layout:

- chunks of at most 128 KiB on `$O.<bucket>.C.<nuid>`, then the object's description
  (`ObjectInfo`, with its size, chunk count and SHA-256) on `$O.<bucket>.M.<base64 name>`, which
  replaces the previous one (`Nats-Rollup: sub`);
- deleting publishes a description marked deleted, and an empty message on the chunks' subject
  that rolls the chunks up (the stream keeps that one empty message until its TTL).
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime

import nats.nuid
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError, ObjectNotFoundError

from kiln.errors import InternalError

__all__ = ["CHUNK_BYTES", "delete_object", "put_object", "read_object"]

CHUNK_BYTES = 128 * 1024  # nats-py's default
_ROLLUP = {"Nats-Rollup": "sub"}
_NUID = nats.nuid.NUID()


def _meta_subject(bucket: str, name: str) -> str:
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


def _digest(data: bytes) -> str:
    return "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()


async def put_object(js: JetStreamContext, bucket: str, name: str, data: bytes) -> None:
    """Store `data` as the object `name` of `bucket` (a new name: an object stored before under
    the same name would keep its chunks until the bucket's TTL)."""
    nuid = _NUID.next().decode()
    chunks = f"$O.{bucket}.C.{nuid}"
    count = 0
    for start in range(0, len(data), CHUNK_BYTES):
        await js.publish(chunks, data[start : start + CHUNK_BYTES])
        count += 1
    info = api.ObjectInfo(
        name=name,
        bucket=bucket,
        nuid=nuid,
        size=len(data),
        chunks=count,
        digest=_digest(data),
        mtime=datetime.now(UTC).isoformat(),
        options=api.ObjectMetaOptions(max_chunk_size=CHUNK_BYTES),
    )
    await js.publish(_meta_subject(bucket, name), _json(info), headers=_ROLLUP)


async def _info(js: JetStreamContext, bucket: str, name: str) -> api.ObjectInfo:
    try:
        msg = await js.get_msg(f"OBJ_{bucket}", subject=_meta_subject(bucket, name), direct=True)
    except NotFoundError:
        raise ObjectNotFoundError from None
    info: api.ObjectInfo = api.ObjectInfo.from_response(json.loads(msg.data or b"{}"))
    if info.deleted:
        raise ObjectNotFoundError
    return info


async def read_object(js: JetStreamContext, bucket: str, name: str) -> bytes:
    """The object `name` of `bucket`, checked against its digest. Raises ObjectNotFoundError
    when there is none (or it was deleted)."""
    info = await _info(js, bucket, name)
    if not info.size:
        return b""
    if not info.nuid or not info.chunks:
        raise InternalError(f"object {name} of {bucket} has no chunks")
    stream, chunks = f"OBJ_{bucket}", f"$O.{bucket}.C.{info.nuid}"
    parts, seq = [], 1
    for _ in range(info.chunks):
        msg = await js.get_msg(stream, seq=seq, subject=chunks, next=True, direct=True)
        parts.append(msg.data or b"")
        seq = (msg.seq or seq) + 1
    data = b"".join(parts)
    if info.digest and info.digest.partition("=")[2] != _digest(data).partition("=")[2]:
        raise InternalError(f"object {name} of {bucket} does not match its digest")
    return data


async def delete_object(js: JetStreamContext, bucket: str, name: str) -> None:
    """Mark the object deleted and roll its chunks up. Raises ObjectNotFoundError when there is
    none."""
    info = await _info(js, bucket, name)
    gone = api.ObjectInfo(
        name=name, bucket=bucket, nuid=info.nuid, size=0, chunks=0, digest="", deleted=True,
        mtime=datetime.now(UTC).isoformat(),
    )  # fmt: skip
    await js.publish(_meta_subject(bucket, name), _json(gone), headers=_ROLLUP)
    if info.nuid:
        await js.publish(f"$O.{bucket}.C.{info.nuid}", b"", headers=_ROLLUP)


def _json(info: api.ObjectInfo) -> bytes:
    return json.dumps(info.as_dict()).encode()

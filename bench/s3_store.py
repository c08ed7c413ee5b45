"""Reading a snapshot-sized object from the S3 store (issue 26): Kiln's ranged, parallel read
(`KILN_STORE_URL=s3://...`) against a single-stream GET of the same object, and against boto3's
own managed download, in one run. Throughput in GB/s, the median of `--runs`.

    .venv/bin/python bench/s3_store.py [--gib 1] [--runs 3] [--streams 8]
        [--endpoint-url URL --bucket NAME]

Without `--endpoint-url` it starts moto's S3 server on loopback. That measures Kiln's side
only, and unfavourably: moto reads the whole object for every ranged GET, so there parallel
ranges cost more than one stream, where S3 (whose single connection tops out far below an
instance's network) gains from them. For the figure that matters, run it on an instance in the
bucket's region with `--endpoint-url https://s3.REGION.amazonaws.com --bucket NAME`. The
object is random bytes written with Kiln's multipart upload.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig

from kiln.blobs import Area
from kiln.blobs.s3_blobs import S3Blobs

GIB = 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--endpoint-url")
    parser.add_argument("--bucket", default="kiln-bench-store")
    args = parser.parse_args()
    server = None
    endpoint = args.endpoint_url
    if endpoint is None:
        from moto.server import ThreadedMotoServer

        from kiln.devstack.ports import pick_port

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        port = pick_port([], set())
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=args.bucket)
    try:
        with tempfile.TemporaryDirectory(prefix="kiln-bench-s3-") as scratch:
            run(Path(scratch), endpoint, args)
    finally:
        if server is not None:
            server.stop()


def run(scratch: Path, endpoint: str, args: argparse.Namespace) -> None:
    size = int(args.gib * GIB)
    blobs = S3Blobs(args.bucket, "bench", Area.SNAPSHOTS, endpoint_url=endpoint,
                    streams=args.streams)  # fmt: skip
    source = scratch / "weights.bin"
    with source.open("wb") as f:
        for _ in range(0, size, 64 * 1024 * 1024):
            f.write(os.urandom(min(64 * 1024 * 1024, size - f.tell())))
    started = time.perf_counter()
    asyncio.run(blobs.put_file("weights.bin", source))
    upload_s = time.perf_counter() - started
    target = scratch / "read.bin"
    client = boto3.client("s3", endpoint_url=endpoint)
    managed = TransferConfig(max_concurrency=args.streams)

    def timed(read: object) -> float:
        times = []
        for _ in range(args.runs):
            target.unlink(missing_ok=True)
            began = time.perf_counter()
            read()  # type: ignore[operator]
            times.append(time.perf_counter() - began)
            assert target.stat().st_size == size
        return statistics.median(times)

    rows = [
        ("one stream (a single GET)", timed(lambda: blobs.download("weights.bin", target,
                                                                  streams=1))),
        (f"boto3 download_file ({args.streams} threads)",
         timed(lambda: client.download_file(args.bucket, blobs.key("weights.bin"), str(target),
                                            Config=managed))),
        (f"Kiln: {args.streams} ranged GETs at once", timed(lambda: blobs.download(
            "weights.bin", target))),
    ]  # fmt: skip
    print(f"\n{size / GIB:.2f} GiB object at {endpoint}; multipart upload "
          f"{size / upload_s / 1e9:.2f} GB/s; median of {args.runs} reads")  # fmt: skip
    print(f"{'':<42} {'seconds':>8} {'GB/s':>7}")
    for name, seconds in rows:
        print(f"{name:<42} {seconds:>8.2f} {size / seconds / 1e9:>7.2f}")


if __name__ == "__main__":
    main()

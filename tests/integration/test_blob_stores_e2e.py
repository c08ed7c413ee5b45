"""The stores `KILN_STORE_URL` names (issue 26): one contract for JetStream's object store, a
directory and S3 (moto's server, a local S3-compatible endpoint, started here), a large blob
written multipart and read back by ranged parallel GETs, and a platform whose code and
snapshots live in S3: a deploy, a cold start that bakes and a second that restores, the
snapshot's files under the bucket's prefix."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from eventually import eventually
from stack import Platform, extra_node, running_platform
from test_pods_e2e import WORK, Screen, terminal
from test_snapshots_e2e import SNAPPY, cold_call

from kiln._nats import connect_options
from kiln.blobs import Area, BlobMissing, BlobStore, open_blob_store, parse_store_url
from kiln.settings import Settings

pytestmark = pytest.mark.integration

BUCKET = "kiln-test-store"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a loopback port, with AWS credentials it accepts, and a bucket."""
    moto_server = pytest.importorskip(
        "moto.server", reason="moto's server is missing: pip install 'moto[s3,server]'"
    )
    import boto3

    from kiln.devstack.ports import pick_port

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}  # fmt: skip
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    port = pick_port([], set())
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
        yield url
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(params=["nats", "file", "s3"])
async def store(
    request: pytest.FixtureRequest, settings: Settings, tmp_path: Path, s3_endpoint: str
) -> AsyncIterator[BlobStore]:
    url = {
        "nats": "nats://",
        "file": f"file://{tmp_path}/store",
        "s3": f"s3://{BUCKET}/contract-{secrets.token_hex(3)}",
    }[request.param]
    chosen = settings.replace(store_url=url, s3_endpoint_url=s3_endpoint)
    nc = await nats.connect(**connect_options(settings))
    blobs = open_blob_store(chosen, Area.SNAPSHOTS, nc.jetstream())
    try:
        yield blobs
    finally:
        await blobs.close()
        await nc.close()


async def test_every_store_keeps_the_same_contract(store: BlobStore, tmp_path: Path) -> None:
    name = f"k{secrets.token_hex(4)}/manifest.json"
    assert not await store.has(name)
    with pytest.raises(BlobMissing):
        await store.get_bytes(name)
    with pytest.raises(BlobMissing):
        await store.get_into(name, tmp_path / "missing")
    await store.put_bytes(name, b'{"a": 1}')
    assert await store.has(name)
    assert await store.get_bytes(name) == b'{"a": 1}'
    big = tmp_path / "weights.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    await store.put_file(f"{name}.bin", big)
    await store.get_into(f"{name}.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    await store.delete(name)
    await store.delete(name)  # nothing to delete: no error
    assert not await store.has(name)


async def test_a_large_blob_goes_up_multipart_and_comes_down_in_parallel_ranges(
    s3_endpoint: str, tmp_path: Path
) -> None:
    from kiln.blobs.s3_blobs import S3Blobs

    part = 5 * 1024 * 1024  # S3's smallest part
    blobs = S3Blobs(BUCKET, "ranged", Area.SNAPSHOTS, endpoint_url=s3_endpoint, part_bytes=part)
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(4 * part + 12345))  # five parts, the last a short one
    await blobs.put_file("big.bin", source)
    head = blobs._client.head_object(Bucket=BUCKET, Key=blobs.key("big.bin"))
    assert head["ETag"].strip('"').endswith("-5")  # S3's mark of a five-part upload
    for streams in (1, 4):
        target = tmp_path / f"back-{streams}.bin"
        assert blobs.download("big.bin", target, streams=streams) == source.stat().st_size
        assert (
            hashlib.sha256(target.read_bytes()).digest()
            == hashlib.sha256(source.read_bytes()).digest()
        )
    await blobs.close()


def test_store_urls_are_read_and_refused_in_words() -> None:
    assert parse_store_url("s3://my-bucket/kiln/prod").prefix == "kiln/prod"
    assert parse_store_url("file:///var/lib/kiln").path == Path("/var/lib/kiln")
    assert parse_store_url("nats://").scheme == "nats"
    with pytest.raises(ValueError, match="a bucket name is 3 to 63 lowercase letters"):
        parse_store_url("s3://Bad_Bucket/x")
    with pytest.raises(ValueError, match="expected nats://, file:///var/lib/kiln/store or s3://"):
        parse_store_url("ftp://host/x")


@pytest.fixture(scope="module")
async def s3_platform(
    settings: Settings, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    in_s3 = settings.replace(store_url=f"s3://{BUCKET}/platform", s3_endpoint_url=s3_endpoint)
    async with running_platform(in_s3, tmp_path_factory.mktemp("s3-home")) as running:
        yield running


async def test_a_platform_keeps_its_code_and_snapshots_in_s3(
    s3_platform: Platform, s3_endpoint: str, tmp_path: Path
) -> None:
    import boto3

    app_file = tmp_path / "snappy.py"
    app_file.write_text(SNAPPY.replace('"snappy"', '"s3snap"'))
    await s3_platform.deploy(app_file)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)

    def keys(prefix: str) -> list[str]:
        listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
        return [str(item["Key"]) for item in listed]

    assert len(keys("platform/code/")) == 1  # the deployed archive, by its sha256
    first = await cold_call(s3_platform, "s3snap/Model.run", "Model")
    assert first["origin"] == "baked"
    # Sealed by the node, then up to S3, the manifest last.
    await eventually(lambda: any(k.endswith("/manifest.json") for k in keys("platform/snapshots/")),
                     within_s=60)  # fmt: skip
    # A node without it in its cache fetches it from S3 (and checks it): empty the cache.
    for snapshot in (s3_platform.settings.home / "snapshots").iterdir():
        if len(snapshot.name) == 64:
            for file in snapshot.iterdir():
                file.chmod(0o644)
                file.unlink()
            snapshot.rmdir()
    second = await cold_call(s3_platform, "s3snap/Model.run", "Model")
    assert second["origin"] == "snapshot"
    assert second["built_in"] == first["built_in"]


async def test_a_stopped_pods_volume_moves_through_s3_and_outlives_its_node(
    s3_platform: Platform, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two nodes of one GPU each: the pod's volume is parked in S3 when it stops; its node then
    goes, and the pod starts on the other node, its files restored there from S3."""
    await s3_platform.deploy_source(tmp_path_factory.mktemp("workbench"), "workbench.py", WORK)
    nodes = {name: contextlib.AsyncExitStack() for name in ("node-a", "node-b")}
    try:
        for name, stack in nodes.items():
            await stack.enter_async_context(
                extra_node(s3_platform, tmp_path / name, name, {"H100": 1})
            )
        async with s3_platform.client() as client:

            async def created() -> dict[str, Any]:  # once the scheduler has heard of the nodes
                made = await client.post("/v1/pods", json={
                    "environment": {"app": "workbench"}, "gpu": "H100", "volume_gb": 1,
                    "name": "mover",
                })  # fmt: skip
                assert made.status_code == 201, made.text
                return dict(made.json())

            pod = await eventually(created, within_s=30)
            async with terminal(s3_platform, pod, cmd="echo moved > ~/kept.txt") as ws:
                assert await Screen(ws).exit_status(within_s=120) == 0
            first = (await client.get(f"/v1/pods/{pod['id']}")).json()["node_id"]
            assert (await client.post(f"/v1/pods/{pod['id']}/stop")).status_code == 200

            async def parked() -> bool:
                view = (await client.get(f"/v1/pods/{pod['id']}")).json()
                return bool(view["volume_parked"])

            await eventually(parked, within_s=60)
            await nodes[first].aclose()  # its node goes, its copy of the volume with it

            async def gone() -> bool:
                listed = (await client.get("/v1/nodes")).json()["nodes"]
                return bool({n["id"]: n["state"] for n in listed}[first] != "ready")

            await eventually(gone, within_s=60)
            assert (await client.post(f"/v1/pods/{pod['id']}/start")).status_code == 200
            async with terminal(s3_platform, pod, cmd="cat ~/kept.txt") as ws:
                screen = Screen(ws)
                assert await screen.exit_status(within_s=120) == 0, screen.text
            assert screen.text.strip() == "moved"
            view = (await client.get(f"/v1/pods/{pod['id']}")).json()
            assert view["node_id"] not in (None, first)
            assert not view["volume_parked"]
            assert (await client.delete(f"/v1/pods/{pod['id']}")).status_code == 204
    finally:
        for stack in nodes.values():
            await stack.aclose()

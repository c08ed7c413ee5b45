"""Payloads larger than a NATS message on the real stack (issue 6): a 50 MB argument and a 50
MB result travel through the payload object store, as does a stream chunk of megabytes; a body
over the router's limit is refused with 413 before it is read."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from eventually import eventually
from stack import Platform, error_of, running_platform

from kiln._nats import connect_options
from kiln.settings import Settings

pytestmark = pytest.mark.integration

LIMIT = 64 * 1024 * 1024

BIG = """
import hashlib

import kiln

app = kiln.App("big")


@app.function(timeout=120)
def flip(data: bytes) -> bytes:
    return hashlib.sha256(data).digest() + data[::-1]


@app.function()
def blobs(size: int):
    yield "small"
    yield "y" * size
    yield "small again"
"""


@pytest.fixture(scope="module", name="platform")
async def platform_with_a_large_limit(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    home = tmp_path_factory.mktemp("payloads-home")
    async with running_platform(settings, home, max_request_bytes=LIMIT, stop_apps=True) as running:
        await running.deploy_source(tmp_path_factory.mktemp("big"), "big.py", BIG)
        yield running


async def test_a_50_mb_argument_and_result_travel_through_the_payload_store(
    platform: Platform,
) -> None:
    data = os.urandom(50 * 1000 * 1000)
    response = await platform.call(
        "big/flip", content=data, headers={"Content-Type": "application/octet-stream"}
    )
    assert response.status_code == 200, response.text[:200]
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.content[:32] == hashlib.sha256(data).digest()
    assert response.content[32:] == data[::-1]
    # Taken means deleted: only the deletion markers are left in the bucket, not 100 MB.
    assert await _stored_bytes(platform) < 10_000


async def test_a_job_with_a_large_argument_and_result(platform: Platform) -> None:
    data = os.urandom(3 * 1000 * 1000)
    async with platform.client() as client:
        spawned = await client.post(
            "/v1/spawn/big/flip",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert spawned.status_code == 202, spawned.text
        call_id = spawned.json()["call_id"]

        async def succeeded() -> dict[str, Any]:
            view: dict[str, Any] = (await client.get(f"/v1/calls/{call_id}")).json()
            if view["status"] not in ("queued", "running", "succeeded"):
                pytest.fail(f"the job did not succeed: {view}")
            return view if view["status"] == "succeeded" else {}

        view = await eventually(succeeded, within_s=60)
        result = await client.get(view["result_url"])
    assert result.headers["content-type"] == "application/octet-stream"
    assert result.content == hashlib.sha256(data).digest() + data[::-1]


async def test_a_stream_chunk_of_megabytes_arrives_in_its_place(platform: Platform) -> None:
    size = 5 * 1000 * 1000
    response = await platform.call("big/blobs", json={"size": size})
    assert response.status_code == 200
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line.get("seq") for line in lines] == [0, 1, 2, None]
    assert lines[1]["data"] == "y" * size
    assert lines[2]["data"] == "small again"
    assert lines[3] == {"end": True, "chunks": 3}


async def test_a_body_over_the_limit_is_refused_before_it_is_read(platform: Platform) -> None:
    # Claims ten gigabytes and sends none of them: the answer cannot wait for the body.
    reader, writer = await asyncio.open_connection(
        httpx.URL(platform.url).host, httpx.URL(platform.url).port
    )
    try:
        writer.write(
            b"POST /v1/run/big/flip HTTP/1.1\r\nHost: kiln\r\nAuthorization: Bearer "
            + platform.key.encode()
            + b"\r\nContent-Type: application/octet-stream\r\nContent-Length: 10000000000\r\n\r\n"
        )
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 10)
        assert status.startswith(b"HTTP/1.1 413"), status
    finally:
        writer.close()
    # And a body that says nothing of its length is cut off once past the limit.
    response = await platform.call(
        "big/flip",
        content=_chunks(LIMIT + 1),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 413
    assert error_of(response)["message"] == f"the body exceeds the limit of {LIMIT} bytes"


async def _chunks(total: int) -> AsyncIterator[bytes]:
    block = b"z" * (1 << 20)
    sent = 0
    while sent < total:
        piece = block[: total - sent]
        sent += len(piece)
        yield piece


async def _stored_bytes(platform: Platform) -> int:
    """What the payload store holds now, in bytes."""
    import nats

    nc = await nats.connect(**connect_options(platform.settings))
    try:
        # Every function's payload bucket (one per function).
        prefix = f"OBJ_{platform.settings.namespace}_payloads_"
        streams = await nc.jetstream().streams_info()
        return sum(int(s.state.bytes) for s in streams if (s.config.name or "").startswith(prefix))
    finally:
        await nc.close()

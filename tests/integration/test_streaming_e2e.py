"""Streaming generators over `POST /v1/run` on the real stack (issue 6): chunks arrive as they
are produced, in order and numbered, as SSE or NDJSON; a slow reader pauses the generator
instead of losing chunks or filling memory; a client that leaves stops the generator (and a
plain call) inside the replica; a replica that dies ends the stream with an error event."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eventually import eventually
from stack import Platform
from typer.testing import CliRunner, Result

from kiln.cli.main import app as cli
from kiln.errors import RemoteError

pytestmark = [pytest.mark.integration, pytest.mark.unsandboxed]

STREAMS = """
import asyncio
import os
import time
from pathlib import Path

import kiln

app = kiln.App("streams")


@app.function()
def tokens(gate: str):
    yield "first"
    Path(gate).read_text()  # a FIFO: the test opens it only once it has read the first chunk
    yield {"second": 2}
    yield b"\\x00\\x01"


@app.function()
async def counted(n: int):
    for i in range(n):
        yield i
        await asyncio.sleep(0)


@app.function()
def fails_after(n: int):
    for i in range(n):
        yield i
    raise ValueError("ran out of tokens")


@app.function()
def big(chunks: int, size: int, progress: str):
    payload = "x" * size
    for i in range(chunks):
        Path(progress).write_text(str(i + 1))
        yield payload


@app.function(concurrency=1)
def endless(closed: str):
    try:
        yield os.getpid()
        while True:
            time.sleep(0.02)
            yield "more"
    finally:
        Path(closed).write_text("closed")


@app.function()
async def endless_async(closed: str):
    try:
        while True:
            yield "more"
            await asyncio.sleep(0.02)
    finally:
        Path(closed).write_text("closed")


@app.function()
async def slow_call(started: str, cancelled: str) -> str:
    Path(started).touch()
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        Path(cancelled).write_text("cancelled")
        raise
    return "finished"
"""


@pytest.fixture(scope="module", name="deployed")
async def deployed_app(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> Platform:
    await platform.deploy_source(tmp_path_factory.mktemp("streams"), "streams.py", STREAMS)
    return platform


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    event: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if event:
                yield event
            event = {}
            continue
        field, _, value = line.partition(": ")
        event[field] = value


async def test_chunks_arrive_as_they_are_produced_as_sse(
    deployed: Platform, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    async with (
        deployed.client() as client,
        client.stream(
            "POST",
            "/v1/run/streams/tokens",
            json={"gate": str(gate)},
            headers={"Accept": "text/event-stream"},
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
        # The generator is stuck until the gate opens: this chunk came before it finished.
        assert await anext(events) == {"id": "0", "data": '"first"'}
        await eventually(lambda: _open(gate), within_s=30)
        rest = [event async for event in events]
    assert rest == [
        {"id": "1", "data": '{"second":2}'},
        {"id": "2", "data": '"AAE="'},  # bytes travel as base64
        {"event": "end", "data": '{"chunks":3}'},
    ]


async def test_ndjson_is_the_default_and_async_generators_stream_too(deployed: Platform) -> None:
    response = await deployed.call("streams/counted", json={"n": 100})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines[:-1] == [{"seq": i, "data": i} for i in range(100)]
    assert lines[-1] == {"end": True, "chunks": 100}


async def test_kiln_call_stream_prints_each_item(deployed: Platform, tmp_path: Path) -> None:
    env = {"KILN_URL": deployed.url, "KILN_API_KEY": deployed.key, "KILN_HOME": str(tmp_path)}

    def kiln(*args: str) -> Result:
        return CliRunner().invoke(cli, list(args), env=env)

    done = await asyncio.to_thread(kiln, "call", "streams/counted", '{"n": 3}', "--stream")
    assert (done.exit_code, done.output) == (0, "0\n1\n2\n")
    failed = await asyncio.to_thread(kiln, "call", "streams/fails_after", '{"n": 1}', "--stream")
    assert failed.output == "0\n"
    assert isinstance(failed.exception, RemoteError)
    assert "ValueError: ran out of tokens (function_error" in str(failed.exception)


async def test_an_error_before_the_first_chunk_is_a_plain_error_response(
    deployed: Platform,
) -> None:
    response = await deployed.call("streams/counted", json={"count": 1})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_arguments"


async def test_an_error_mid_stream_is_the_last_event_after_the_chunks_before_it(
    deployed: Platform,
) -> None:
    response = await deployed.call("streams/fails_after", json={"n": 3})
    assert response.status_code == 200
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines[:3] == [{"seq": i, "data": i} for i in range(3)]
    error = lines[3]["error"]
    assert (error["code"], error["message"]) == ("function_error", "ValueError: ran out of tokens")
    assert error["request_id"] == response.headers["x-request-id"]
    assert len(lines) == 4


async def test_a_slow_reader_pauses_the_generator_and_loses_nothing(
    deployed: Platform, tmp_path: Path
) -> None:
    chunks, size = 1000, 64 * 1024
    progress = tmp_path / "progress"
    body = json.dumps({"chunks": chunks, "size": size, "progress": str(progress)}).encode()
    reader = await _SlowReader.open(deployed, "/v1/run/streams/big", body)
    try:
        first = [await reader.line() for _ in range(10)]
        assert [json.loads(line)["seq"] for line in first] == list(range(10))
        # Stop reading: the generator must stop soon after, held back by the credit.
        await asyncio.sleep(1.0)
        paused_at = int(progress.read_text())
        await asyncio.sleep(1.0)
        assert int(progress.read_text()) == paused_at, "the generator kept going"
        # The 10 read, the router's window (32), what the kernel's send buffer holds, and a few
        # in this reader's, the receive and uvicorn's buffers: bounded, far from all 1000.
        assert paused_at <= 10 + 32 + _send_buffer_bytes() // size + 16, paused_at
        seqs = []
        while True:
            line = json.loads(await reader.line())
            if "end" in line:
                break
            assert len(line["data"]) == size
            seqs.append(line["seq"])
        assert seqs == list(range(10, chunks))
        assert line == {"end": True, "chunks": chunks}
    finally:
        reader.close()


async def test_a_client_that_leaves_stops_the_generator_and_frees_its_slot(
    deployed: Platform, tmp_path: Path
) -> None:
    for name in ("endless", "endless_async"):
        closed = tmp_path / f"{name}.closed"
        async with (
            deployed.client() as client,
            client.stream(
                "POST", f"/v1/run/streams/{name}", json={"closed": str(closed)}
            ) as response,
        ):
            lines = response.aiter_lines()
            await anext(lines)
            await anext(lines)
        # The connection is closed: the generator's finally runs in the replica.
        await eventually(closed.exists, within_s=10)
    # endless has concurrency 1: its slot is free again for the next call.
    closed = tmp_path / "again.closed"
    async with (
        deployed.client() as client,
        client.stream("POST", "/v1/run/streams/endless", json={"closed": str(closed)}) as response,
    ):
        assert json.loads(await anext(response.aiter_lines()))["seq"] == 0
    await eventually(closed.exists, within_s=10)


async def test_a_client_that_leaves_cancels_a_plain_call_in_the_replica(
    deployed: Platform, tmp_path: Path
) -> None:
    started, cancelled = tmp_path / "started", tmp_path / "cancelled"
    body = {"started": str(started), "cancelled": str(cancelled)}
    async with deployed.client() as client:
        call = asyncio.create_task(client.post("/v1/run/streams/slow_call", json=body))
        await eventually(started.exists, within_s=10)  # taken by a replica, and sleeping
        call.cancel()  # closes the connection
        with pytest.raises(asyncio.CancelledError):
            await call
    await eventually(cancelled.exists, within_s=10)


async def test_a_replica_that_dies_mid_stream_ends_it_with_worker_lost(
    deployed: Platform, tmp_path: Path
) -> None:
    closed = tmp_path / "never"
    async with (
        deployed.client() as client,
        client.stream(
            "POST",
            "/v1/run/streams/endless",
            json={"closed": str(closed)},
            headers={"Accept": "text/event-stream"},
        ) as response,
    ):
        events = sse_events(response)
        pid = int((await anext(events))["data"])
        os.killpg(pid, signal.SIGKILL)
        last: dict[str, str] = {}
        async for event in events:
            last = event
    assert last["event"] == "error"
    assert json.loads(last["data"])["error"]["code"] == "worker_lost"


def _send_buffer_bytes() -> int:
    """The most a TCP socket's send buffer grows to on this (Linux) machine."""
    return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])


def _open(fifo: Path) -> bool:
    """Open `fifo` and close it at once: its reader reads to the end."""
    try:  # without blocking, which fails until the reader has it open
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError as error:
        raise AssertionError(f"no reader at {fifo.name}: {error}") from error
    return True


class _SlowReader:
    """An HTTP/1.1 client on a socket with a small receive buffer (so the kernel does not
    quietly buffer megabytes for it), reading a chunked NDJSON response line by line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffer = b""

    @classmethod
    async def open(cls, platform: Platform, path: str, body: bytes) -> _SlowReader:
        url = httpx.URL(platform.url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (url.host, url.port or 80))
        reader, writer = await asyncio.open_connection(sock=sock, limit=256 * 1024)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {url.host}\r\nAuthorization: Bearer {platform.key}"
            f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        status = await reader.readline()
        assert status.startswith(b"HTTP/1.1 200"), status
        headers: dict[str, Any] = {}
        while (line := await reader.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        assert headers["transfer-encoding"] == "chunked"
        return cls(reader, writer)

    async def line(self) -> bytes:
        while b"\n" not in self.buffer:
            size = int((await self.reader.readline()).strip(), 16)
            self.buffer += await self.reader.readexactly(size)
            await self.reader.readexactly(2)
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def close(self) -> None:
        self.writer.close()

"""Streams, WebSocket sessions and jobs through Kiln, in one run:

1. per-chunk latency of a token-streaming generator: from the yield in the replica to the
   chunk's arrival at the client (same machine, same clock), p50/p99;
2. a WebSocket echo of 20 ms audio frames (640 bytes, 50 a second) for --seconds: round trip
   p50/p99/max through Kiln, against the same echo in a bare Starlette WebSocket app;
3. job throughput: jobs spawned per second through one router, and finished per second.

    .venv/bin/python bench/streaming.py [--seconds 60] [--jobs 500]

Kiln runs as `kiln dev` (embedded NATS, PostgreSQL and Redis) with one replica per function;
the bare app runs under uvicorn. Both on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from warm_path import start_kiln, wait_http
from websockets.asyncio.client import connect

from kiln.devstack.ports import pick_port
from kiln.functions.package import package

APP = """
import time

import kiln

app = kiln.App("streaming")


@app.function(concurrency=4, min_replicas=1)
def tokens(n: int, gap_ms: float):
    for i in range(n):
        time.sleep(gap_ms / 1000)
        yield {"i": i, "t": time.time()}


@app.function(concurrency=4, min_replicas=1)
@kiln.websocket()
async def echo(session: kiln.Session) -> None:
    async for message in session:
        await session.send(message)


@app.function(concurrency=32, min_replicas=1)
def job(x: int) -> int:
    return x
"""

BARE = """
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_bytes(await websocket.receive_bytes())
    except WebSocketDisconnect:
        pass


app = Starlette(routes=[WebSocketRoute("/echo", echo)])
"""

FRAME_BYTES = 640
FRAME_EVERY_S = 0.020


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def chunk_latency(url: str, key: str, n: int, gap_ms: float) -> list[float]:
    latencies = []
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/x-ndjson"}
    async with (
        httpx.AsyncClient(timeout=120) as client,
        client.stream(
            "POST", f"{url}/v1/run/streaming/tokens", json={"n": n, "gap_ms": gap_ms},
            headers=headers,
        ) as response,
    ):  # fmt: skip
        response.raise_for_status()
        async for line in response.aiter_lines():
            item = json.loads(line)
            if "data" in item:
                latencies.append(time.time() - item["data"]["t"])
    return latencies


async def ws_echo(url: str, seconds: float, headers: dict[str, str]) -> list[float]:
    """Round trips of one frame every 20 ms for `seconds`, frames sent on schedule (not after
    the previous echo), as a voice client does."""
    frames = int(seconds / FRAME_EVERY_S)
    sent_at: list[float] = [0.0] * frames
    rtts: list[float] = []
    async with connect(url, additional_headers=headers, open_timeout=60, compression=None) as ws:

        async def receive() -> None:
            for _ in range(frames):
                message = await ws.recv()
                assert isinstance(message, bytes)
                seq = int.from_bytes(message[:4], "big")
                rtts.append(time.perf_counter() - sent_at[seq])

        receiver = asyncio.create_task(receive())
        start = time.perf_counter()
        for seq in range(frames):
            await asyncio.sleep(max(0.0, start + seq * FRAME_EVERY_S - time.perf_counter()))
            sent_at[seq] = time.perf_counter()
            await ws.send(seq.to_bytes(4, "big") + bytes(FRAME_BYTES - 4))
        await asyncio.wait_for(receiver, 30)
    return rtts


async def job_throughput(url: str, key: str, count: int) -> tuple[float, float]:
    """Seconds to spawn `count` jobs (16 at a time), and until all of them finished."""
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
        ids: list[str] = []
        start = time.perf_counter()
        queue = list(range(count))

        async def spawner() -> None:
            while queue:
                x = queue.pop()
                response = await client.post("/v1/spawn/streaming/job", json={"x": x})
                response.raise_for_status()
                ids.append(response.json()["call_id"])

        await asyncio.gather(*(spawner() for _ in range(16)))
        spawned = time.perf_counter() - start
        pending = set(ids)
        while pending:
            checks = await asyncio.gather(*(client.get(f"/v1/calls/{i}") for i in pending))
            for response in checks:
                view = response.json()
                if view["status"] in ("succeeded", "failed", "cancelled"):
                    pending.discard(view["call_id"])
            if pending:
                await asyncio.sleep(0.05)
        return spawned, time.perf_counter() - start


def start_bare(directory: Path, port: int) -> subprocess.Popen[bytes]:
    (directory / "bare_ws.py").write_text(BARE)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bare_ws:app", "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        cwd=directory,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def row(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"  {name:<16} {statistics.median(ms):>8.2f} {percentile(ms, 0.99):>8.2f} "
        f"{max(ms):>8.2f} {len(ms):>8}"
    )


async def run(args: argparse.Namespace, kiln_port: int, key: str, bare_port: int) -> None:
    url = f"http://127.0.0.1:{kiln_port}"
    # Warm everything once (the replicas are up already: min_replicas=1).
    await chunk_latency(url, key, 5, 1)
    latencies = await chunk_latency(url, key, args.tokens, args.gap_ms)
    print(f"\nstreaming: {args.tokens} chunks, {args.gap_ms:g} ms apart; yield -> client")
    print(f"  p50 {statistics.median(latencies) * 1000:.2f} ms   "
          f"p99 {percentile(latencies, 0.99) * 1000:.2f} ms   "
          f"max {max(latencies) * 1000:.2f} ms")  # fmt: skip

    ws_kiln = url.replace("http", "ws") + "/v1/ws/streaming/echo"
    auth = {"Authorization": f"Bearer {key}"}
    kiln_rtts = await ws_echo(ws_kiln, args.seconds, auth)
    bare_rtts = await ws_echo(f"ws://127.0.0.1:{bare_port}/echo", args.seconds, {})
    print(f"\nwebsocket echo: {FRAME_BYTES} B every {FRAME_EVERY_S * 1000:g} ms for "
          f"{args.seconds:g} s; round trip (ms)")  # fmt: skip
    print(f"  {'':<16} {'p50':>8} {'p99':>8} {'max':>8} {'frames':>8}")
    print(row("kiln", kiln_rtts))
    print(row("bare starlette", bare_rtts))
    print(f"  kiln adds {(statistics.median(kiln_rtts) - statistics.median(bare_rtts)) * 1000:.2f}"
          " ms at p50")  # fmt: skip

    spawned, finished = await job_throughput(url, key, args.jobs)
    print(f"\njobs: {args.jobs} spawned in {spawned:.2f} s ({args.jobs / spawned:.0f}/s "
          f"accepted); all finished after {finished:.2f} s "
          f"({args.jobs / finished:.0f}/s)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--gap-ms", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        home = Path(tmp)
        app_file = home / "streaming_app.py"
        app_file.write_text(APP)
        kiln_port = pick_port([], set())
        bare_port = pick_port([], {kiln_port})
        kiln, key = start_kiln(home, kiln_port)
        bare = None
        try:
            bare = start_bare(home, bare_port)
            body = package(app_file).deploy_body()
            headers = {"Authorization": f"Bearer {key}"}
            url = f"http://127.0.0.1:{kiln_port}"
            httpx.post(f"{url}/v1/apps", json=body, headers=headers, timeout=60).raise_for_status()
            httpx.post(f"{url}/v1/run/streaming/job", json={"x": 1}, headers=headers,
                       timeout=120).raise_for_status()  # fmt: skip
            wait_http(f"{url}/healthz")
            print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
            asyncio.run(run(args, kiln_port, key, bare_port))
        finally:
            if bare is not None:
                bare.send_signal(signal.SIGTERM)
                bare.wait(30)
            kiln.send_signal(signal.SIGTERM)
            kiln.wait(60)


if __name__ == "__main__":
    main()

"""Pods: a terminal's keystroke round trip, and a forwarded port's throughput against a direct
connection to the same server, in one run.

    .venv/bin/python bench/pods.py [--keys 300] [--mib 64] [--small 300]

It runs `kiln dev` (embedded NATS, PostgreSQL and Redis; sandboxed when run as root with
bubblewrap), deploys a small app, makes a pod of it with port 8765, and from its terminal
starts Python's HTTP server on a file of random bytes. Then:

- keystrokes: one byte typed into `cat` on the pod's terminal (`WS /v1/pods/ID/terminal`),
  timed until the terminal's echo of it comes back;
- small requests and a large download from the pod's server: directly on 127.0.0.1:8765 (the
  pod's sandbox shares the host's network: the baseline), through the router's
  `/v1/pods/ID/ports/8765/`, and through `kiln pods forward`'s local port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import httpx
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from warm_path import _stop, start_kiln

from kiln.cli.pods import forward_port
from kiln.client import connect as kiln_client
from kiln.devstack.ports import pick_port
from kiln.functions.package import package

APP = """
import kiln

app = kiln.App("podbench")


@app.function(gpu="none")
def noop() -> None:
    return None
"""
PORT = 8765


def ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def terminal_round_trips(ws_url: str, key: str, keys: int) -> list[float]:
    headers = {"Authorization": f"Bearer {key}"}
    times = []
    async with connect(f"{ws_url}?{urlencode({'cmd': 'cat'})}", additional_headers=headers,
                       open_timeout=120) as ws:  # fmt: skip
        for _ in range(keys):
            started = time.perf_counter()
            await ws.send(b"x")
            echoed = b""
            while b"x" not in echoed:
                message = await ws.recv()
                if isinstance(message, bytes):
                    echoed += message
            times.append(time.perf_counter() - started)
        await ws.send(b"\x04")  # end of input: cat exits
    return times


async def run_command(ws_url: str, key: str, command: str) -> str:
    headers = {"Authorization": f"Bearer {key}"}
    out = ""
    async with connect(f"{ws_url}?{urlencode({'cmd': command})}", additional_headers=headers,
                       open_timeout=120) as ws:  # fmt: skip
        async for message in ws:
            if isinstance(message, bytes):
                out += message.decode(errors="replace")
            elif json.loads(message).get("type") == "exit":
                break
    return out


def fetch_times(base: str, path: str, count: int, headers: dict[str, str]) -> list[float]:
    times = []
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        for _ in range(count):
            started = time.perf_counter()
            client.get(path).raise_for_status()
            times.append(time.perf_counter() - started)
    return times


def download_rate(base: str, path: str, headers: dict[str, str], size: int) -> float:
    """MB/s of one download of `size` bytes."""
    with httpx.Client(base_url=base, headers=headers, timeout=300) as client:
        started = time.perf_counter()
        got = 0
        with client.stream("GET", path) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                got += len(chunk)
        elapsed = time.perf_counter() - started
    if got != size:
        raise RuntimeError(f"{path}: {got} bytes, expected {size}")
    return size / elapsed / 1e6


async def tunnel_rate(ws_url: str, key: str, size: int) -> float:
    """MB/s of one HTTP/1.0 download over `WS /v1/pods/ID/tunnel/PORT` with an asyncio
    WebSocket client: the router's tunnel without `kiln pods forward`'s local side."""
    headers = {"Authorization": f"Bearer {key}"}
    async with connect(ws_url, additional_headers=headers, max_size=None, compression=None) as ws:
        started = time.perf_counter()
        await ws.send(b"GET /blob HTTP/1.0\r\n\r\n")
        got = 0
        async for message in ws:
            got += len(message)
        elapsed = time.perf_counter() - started
    if got < size:
        raise RuntimeError(f"the tunnel gave {got} bytes, expected {size} and headers")
    return size / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=300, help="keystrokes timed")
    parser.add_argument("--mib", type=int, default=64, help="size of the download, MiB")
    parser.add_argument("--small", type=int, default=300, help="small requests timed")
    args = parser.parse_args()
    size = args.mib * 2**20
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        port = pick_port([], set())
        kiln, key = start_kiln(home, port)
        try:
            url = f"http://127.0.0.1:{port}"
            headers = {"Authorization": f"Bearer {key}"}
            (Path(tmp) / "podbench.py").write_text(APP)
            body = package(Path(tmp) / "podbench.py").deploy_body()
            httpx.post(f"{url}/v1/apps", json=body, headers=headers, timeout=60).raise_for_status()
            pod = httpx.post(f"{url}/v1/pods", headers=headers, timeout=60, json={
                "environment": {"app": "podbench"}, "ports": [PORT], "name": "bench",
            }).json()  # fmt: skip
            prefix = f"/v1/pods/{pod['id']}/ports/{PORT}"
            ws_url = url.replace("http://", "ws://") + pod["terminal"]
            # The server's files: at / for direct and forwarded requests, and under the
            # router's prefix (the path it keeps) for requests through the router.
            www = "/tmp/www"  # noqa: S108 - the pod's own /tmp, in its sandbox
            start = (
                f"mkdir -p {www}{prefix} && head -c {size} /dev/urandom > {www}/blob && "
                f"echo ok > {www}/ping && ln -s {www}/blob {www}/ping {www}{prefix}/ && "
                f"setsid -f python3 -m http.server {PORT} --bind 127.0.0.1 --directory {www} "
                ">/dev/null 2>&1 </dev/null && sleep 1 && echo started"
            )
            started = time.perf_counter()
            out = asyncio.run(run_command(ws_url, key, start))
            if "started" not in out:
                raise RuntimeError(f"the pod's server did not start: {out}")
            print(f"pod ready and its server started in {time.perf_counter() - started:.1f} s")
            keys = asyncio.run(terminal_round_trips(ws_url, key, args.keys))

            listener = socket.create_server(("127.0.0.1", 0))
            local = listener.getsockname()[1]
            stop = threading.Event()
            client = kiln_client(url=url, api_key=key)
            forwarding = threading.Thread(
                target=forward_port, args=(client, pod["id"], PORT, listener, stop), daemon=True
            )
            forwarding.start()
            routes = {
                "direct (127.0.0.1:8765)": (f"http://127.0.0.1:{PORT}", "", {}),
                "router /v1/pods/ID/ports/8765/": (url, prefix, headers),
                "kiln pods forward": (f"http://127.0.0.1:{local}", "", {}),
            }
            rows = []
            for name, (base, path, auth) in routes.items():
                small = fetch_times(base, f"{path}/ping", args.small, auth)
                rate = download_rate(base, f"{path}/blob", auth, size)
                rows.append((name, ms(small, 0.5), ms(small, 0.99), rate))
            tunnel_url = f"{url.replace('http://', 'ws://')}/v1/pods/{pod['id']}/tunnel/{PORT}"
            rows.append(("router WS /tunnel (asyncio client)", float("nan"), float("nan"),
                         asyncio.run(tunnel_rate(tunnel_url, key, size))))  # fmt: skip
            stop.set()
            client.close()
        finally:
            _stop(kiln, 30)
    print(f"\nterminal keystroke round trip ({args.keys} keys): p50 {ms(keys, 0.5):.2f} ms, "
          f"p90 {ms(keys, 0.9):.2f} ms, p99 {ms(keys, 0.99):.2f} ms, "
          f"mean {statistics.mean(keys) * 1000:.2f} ms")  # fmt: skip
    print(f"\n{'path to the pod server':34} {'small p50 ms':>13} {'small p99 ms':>13} "
          f"{args.mib} MiB MB/s")  # fmt: skip
    for name, p50, p99, rate in rows:
        print(f"{name:34} {p50:13.2f} {p99:13.2f} {rate:12.1f}")


if __name__ == "__main__":
    main()

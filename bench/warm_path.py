"""Warm-path overhead: a trivial function called through Kiln against a bare Starlette app that
calls the same function in-process, on the same machine, in one run.

    .venv/bin/python bench/warm_path.py [--requests 3000] [--rounds 1] [--invocation-log compare]

Both servers run as their own processes (uvicorn, loopback); Kiln's is `kiln dev` with its
embedded NATS, PostgreSQL and Redis and one replica of the function. The load generator is a
minimal keep-alive HTTP/1.1 client on asyncio, so its own cost stays far below a millisecond.
Targets (design.md): overhead p50 <= 1 ms and p99 <= 5 ms at one client; throughput at least
half of the bare app's. With `--invocation-log compare` a second `kiln dev` runs with the
invocation log off and is measured alongside, round by round (issue 9: the log must not slow
the calls it records).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from kiln.devstack.ports import pick_port
from kiln.functions.package import package

PROFILE: list[str] = []
ROOT = Path(__file__).resolve().parents[1]

APP = """
import kiln

app = kiln.App("bench")


@app.function(concurrency=64, min_replicas=1)
def echo(x: int) -> int:
    return x
"""

BARE = """
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def echo(x: int) -> int:
    return x


async def run(request: Request) -> Response:
    kwargs = json.loads(await request.body())
    return Response(json.dumps(echo(**kwargs)), media_type="application/json")


app = Starlette(routes=[Route("/v1/run/bench/echo", run, methods=["POST"])])
"""


@dataclass
class Result:
    target: str
    clients: int
    p50_ms: float
    p99_ms: float
    rps: float
    cpu_us: float  # CPU time of the server process per request (user + system)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Connection:
    """One keep-alive HTTP/1.1 connection; enough of the protocol for these two servers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def post(self, request: bytes) -> bytes:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await self.reader.readexactly(length)
        if status != b"200":
            raise RuntimeError(f"HTTP {status.decode()}: {body[:200]!r}")
        return body

    def close(self) -> None:
        self.writer.close()


def build_request(port: int, key: str | None) -> bytes:
    body = b'{"x": 7}'
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        f"POST /v1/run/bench/echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def measure(
    target: str, port: int, key: str | None, clients: int, requests: int, pid: int
) -> Result:
    request = build_request(port, key)
    connections = [await Connection.open(port) for _ in range(clients)]
    latencies: list[float] = []
    per_client = max(1, requests // clients)

    async def worker(conn: Connection, count: int, record: bool) -> None:
        for _ in range(count):
            started = time.perf_counter()
            await conn.post(request)
            if record:
                latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker(c, 50, record=False) for c in connections))  # warm up
    began, cpu_began = time.perf_counter(), cpu_seconds(pid)
    await asyncio.gather(*(worker(c, per_client, record=True) for c in connections))
    elapsed, cpu = time.perf_counter() - began, cpu_seconds(pid) - cpu_began
    for conn in connections:
        conn.close()
    latencies.sort()
    return Result(
        target,
        clients,
        statistics.median(latencies) * 1000,
        latencies[int(len(latencies) * 0.99) - 1] * 1000,
        len(latencies) / elapsed,
        cpu / len(latencies) * 1e6,
    )


def wait_http(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def start_kiln(home: Path, port: int, **settings: str) -> tuple[subprocess.Popen[bytes], str]:
    """`kiln dev` on `port` with its own home; `settings` are extra KILN_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update({"KILN_HOME": str(home), "KILN_LOG_LEVEL": "warning", **settings})
    proc = subprocess.Popen(
        [sys.executable, *PROFILE, "-m", "kiln", "dev", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(home / "kiln.log", "wb"),  # noqa: SIM115 - the child owns it
    )
    wait_http(f"http://127.0.0.1:{port}/healthz")
    key = next(
        line.split('"')[1]
        for line in (home / "config.toml").read_text().splitlines()
        if line.startswith("api_key")
    )
    return proc, key


def deploy(port: int, key: str, app_file: Path) -> None:
    pkg = package(app_file)
    body = pkg.deploy_body()
    headers = {"Authorization": f"Bearer {key}"}
    url = f"http://127.0.0.1:{port}"
    httpx.post(f"{url}/v1/apps", json=body, headers=headers, timeout=60).raise_for_status()
    # The first call waits for the replica to start; after that the path is warm.
    response = httpx.post(f"{url}/v1/run/bench/echo", json={"x": 1}, headers=headers, timeout=120)
    response.raise_for_status()


def start_bare(directory: Path, port: int) -> subprocess.Popen[bytes]:
    (directory / "bare_app.py").write_text(BARE)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bare_app:app", "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        cwd=directory,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.post(f"http://127.0.0.1:{port}/v1/run/bench/echo", json={"x": 1}, timeout=1)
            return proc
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def report(results: list[Result]) -> None:
    print(f"\n{'target':<8} {'clients':>7} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9} "
          f"{'server CPU us/req':>18}")  # fmt: skip
    for r in results:
        print(f"{r.target:<8} {r.clients:>7} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.rps:>9.0f} "
              f"{r.cpu_us:>18.0f}")  # fmt: skip
    by = {(r.target, r.clients): r for r in results}
    print("\nKiln against the bare app (targets from design.md):")
    for clients in sorted({r.clients for r in results}):
        bare, kiln = by[("bare", clients)], by[("kiln", clients)]
        p50 = kiln.p50_ms - bare.p50_ms
        p99 = kiln.p99_ms - bare.p99_ms
        ratio = kiln.rps / bare.rps
        line = f"  {clients:>2} client(s): overhead p50 {p50:+.2f} ms, p99 {p99:+.2f} ms"
        if clients == 1:
            line += f" (targets <= 1 ms: {'met' if p50 <= 1 else 'missed'}, <= 5 ms: "
            line += f"{'met' if p99 <= 5 else 'missed'})"
        print(f"{line}; throughput {ratio:.2f}x of bare (target >= 0.5: "
              f"{'met' if ratio >= 0.5 else 'missed'})")  # fmt: skip
    # On a machine with fewer cores than processes (client, router, NATS, replica) the
    # measured ratio also charges Kiln for its other processes; the CPU each server spends per
    # request says what one router sustains when it has a core to itself.
    bare, kiln = by[("bare", 16)], by[("kiln", 16)]
    cpu_ratio = bare.cpu_us / kiln.cpu_us
    print(f"  router CPU per request {kiln.cpu_us:.0f} us against {bare.cpu_us:.0f} us: "
          f"{cpu_ratio:.2f}x of bare's throughput with a core each (target >= 0.5: "
          f"{'met' if cpu_ratio >= 0.5 else 'missed'})")  # fmt: skip


@dataclass
class Server:
    target: str
    port: int
    pid: int
    key: str | None = None


async def run_all(servers: list[Server], requests: int, rounds: int) -> list[Result]:
    """Each server measured at 1 and 16 clients, interleaved round by round so that drift on
    a busy machine hits them all alike; per target and clients, the median of the rounds."""
    runs: dict[tuple[str, int], list[Result]] = {}
    for _ in range(rounds):
        for clients in (1, 16):
            for s in servers:
                result = await measure(s.target, s.port, s.key, clients, requests, s.pid)
                runs.setdefault((s.target, clients), []).append(result)
    return [
        Result(
            target,
            clients,
            statistics.median(r.p50_ms for r in rs),
            statistics.median(r.p99_ms for r in rs),
            statistics.median(r.rps for r in rs),
            statistics.median(r.cpu_us for r in rs),
        )
        for (target, clients), rs in runs.items()
    ]


def log_counts(port: int, key: str) -> dict[str, float]:
    """The invocation log writer's counters, from the router's /metrics."""
    text = httpx.get(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {key}"}
    ).text
    counts = {}
    for line in text.splitlines():
        for name in ("rows_written", "rows_dropped", "pending_rows"):
            if line.startswith(f"kiln_invocation_log_{name}") and "_created" not in line:
                counts[name] = float(line.split()[-1])
    return counts


def report_invocation_log(results: list[Result], counts: dict[str, float]) -> None:
    print("\nThe invocation log's cost (kiln: rows written; kiln-nolog: KILN_INVOCATION_LOG=off):")
    by = {(r.target, r.clients): r for r in results}
    for clients in (1, 16):
        a, b = by[("kiln", clients)], by[("kiln-nolog", clients)]
        print(f"  {clients:>2} client(s): p50 {a.p50_ms:.2f} vs {b.p50_ms:.2f} ms, p99 "
              f"{a.p99_ms:.2f} vs {b.p99_ms:.2f} ms, {a.rps:.0f} vs {b.rps:.0f} req/s, router "
              f"CPU {a.cpu_us:.0f} vs {b.cpu_us:.0f} us/req")  # fmt: skip
    print(
        f"  rows written {counts.get('rows_written', 0):.0f}, dropped "
        f"{counts.get('rows_dropped', 0):.0f}, still pending {counts.get('pending_rows', 0):.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians")
    parser.add_argument(
        "--invocation-log",
        choices=("on", "compare"),
        default="on",
        help="compare: also run Kiln with KILN_INVOCATION_LOG=off, measured alongside",
    )
    args = parser.parse_args()
    kilns: list[tuple[str, dict[str, str]]] = [("kiln", {})]
    if args.invocation_log == "compare":
        kilns.append(("kiln-nolog", {"KILN_INVOCATION_LOG": "off"}))
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp, contextlib.ExitStack() as stop:
        home = Path(tmp)
        app_file = home / "bench_app.py"
        app_file.write_text(APP)
        taken: set[int] = set()
        servers = []
        for target, settings in kilns:
            (home / target).mkdir()
            port = pick_port([], taken)
            taken.add(port)
            proc, key = start_kiln(home / target, port, **settings)
            stop.callback(_stop, proc, 60)
            deploy(port, key, app_file)
            servers.append(Server(target, port, proc.pid, key))
        bare_port = pick_port([], taken)
        bare = start_bare(home, bare_port)
        stop.callback(_stop, bare, 30)
        servers.insert(0, Server("bare", bare_port, bare.pid))
        print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
              f"{args.requests} requests per measurement, {args.rounds} round(s)")  # fmt: skip
        results = asyncio.run(run_all(servers, args.requests, args.rounds))
        report([r for r in results if r.target != "kiln-nolog"])
        if args.invocation_log == "compare":
            time.sleep(6)  # one flush interval: the last batch is written
            report_invocation_log(results, log_counts(servers[1].port, servers[1].key or ""))


def _stop(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout_s)


if __name__ == "__main__":
    main()

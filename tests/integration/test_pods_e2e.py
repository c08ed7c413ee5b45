"""Shells and pods on the real stack, in the sandbox, reached only through the router.

A shell is a fresh replica of a function: its terminal is a real PTY (the window's size,
Ctrl-C, the function's environment), the command's exit status comes back, the replica goes
when the terminal ends and its time is billed like any replica's. A pod holds its replica
until it is stopped: servers started in it answer through the router on its forwarded ports
(HTTP, WebSocket, a raw TCP tunnel), and stop and start give it a new replica."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import sqlalchemy as sa
from eventually import eventually
from sqlalchemy.ext.asyncio import AsyncEngine
from stack import Platform, error_of
from typer.testing import CliRunner, Result
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from kiln.cli.main import app as cli
from kiln.cli.pods import forward_port
from kiln.client import connect as kiln_client
from kiln.db.models import Pod, UsageEvent

pytestmark = pytest.mark.integration

WORK = """
import kiln

app = kiln.App("workbench")


@app.function(gpu="none", env={"GREETING": "hello from the function"})
def work(x: int) -> int:
    return x
"""


@pytest.fixture(scope="module", name="deployed")
async def deployed_app(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> Platform:
    await platform.deploy_source(tmp_path_factory.mktemp("workbench"), "workbench.py", WORK)
    return platform


async def new_shell(platform: Platform) -> dict[str, Any]:
    async with platform.client() as client:
        response = await client.post("/v1/pods", json={"shell": "workbench/work"})
    assert response.status_code == 201, response.text
    pod: dict[str, Any] = response.json()
    return pod


def terminal(platform: Platform, pod: dict[str, Any], **params: str) -> connect:
    query = f"?{urlencode(params)}" if params else ""
    url = platform.url.replace("http://", "ws://") + pod["terminal"] + query
    return connect(url, additional_headers={"Authorization": f"Bearer {platform.key}"},
                   open_timeout=120)  # fmt: skip


class Screen:
    """What a terminal printed, read until something appears."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.text = ""
        self.exit: int | None = None

    async def until(self, wanted: str, *, within_s: float = 30) -> str:
        try:
            return await asyncio.wait_for(self._until(wanted), within_s)
        except TimeoutError:
            raise AssertionError(f"no {wanted!r} within {within_s} s: {self.text!r}") from None

    async def _until(self, wanted: str) -> str:
        while wanted not in self.text:
            message = await self.ws.recv()
            if isinstance(message, bytes):
                self.text += message.decode(errors="replace")
            else:
                self.exit = int(json.loads(message)["code"])
                if wanted not in self.text:
                    raise AssertionError(f"exited {self.exit} before {wanted!r}: {self.text}")
        return self.text

    async def exit_status(self, *, within_s: float = 30) -> int:
        async with asyncio.timeout(within_s):
            while self.exit is None:
                message = await self.ws.recv()
                if isinstance(message, bytes):
                    self.text += message.decode(errors="replace")
                else:
                    self.exit = int(json.loads(message)["code"])
        return self.exit


async def pod_row(engine: AsyncEngine, pod_id: str) -> Pod:
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(Pod).where(Pod.id == uuid.UUID(pod_id)))).one()
    return row  # type: ignore[return-value]


async def test_a_command_runs_in_the_functions_environment_and_returns_its_status(
    deployed: Platform, engine: AsyncEngine
) -> None:
    pod = await new_shell(deployed)
    assert (pod["kind"], pod["function"], pod["state"]) == ("shell", "workbench/work", "starting")
    opened = time.monotonic()
    command = "echo $GREETING; tty; stty size; exit 3"
    async with terminal(deployed, pod, cmd=command, cols="100", rows="30") as ws:
        screen = Screen(ws)
        assert await screen.exit_status(within_s=120) == 3
    lifetime = time.monotonic() - opened
    lines = [line.strip() for line in screen.text.splitlines()]
    assert lines[0] == "hello from the function"
    assert lines[1].startswith("/dev/pts/")  # a real terminal
    assert lines[2] == "30 100"  # of the size asked for

    # The shell ended with its terminal: its row, its replica, and its billed time.
    async def ended() -> Any:
        row = await pod_row(engine, pod["id"])
        return row if row.state.value == "ended" else None

    row = await eventually(ended, within_s=30)
    replica = str(row.replica_id)

    async def billed() -> list[Any]:
        async with engine.connect() as conn:
            events = (
                await conn.execute(
                    sa.select(UsageEvent).where(UsageEvent.replica_id == row.replica_id)
                )
            ).all()
        replicas = await deployed.replicas("workbench/work")
        return list(events) if events and replica not in {r["id"] for r in replicas} else []

    events = await eventually(billed, within_s=60)
    seconds = sum(e.duration_ms for e in events) / 1000
    assert 0 < seconds <= lifetime + 5, (seconds, lifetime)


async def test_an_interactive_shell_resizes_takes_ctrl_c_and_exits_with_its_status(
    deployed: Platform,
) -> None:
    pod = await new_shell(deployed)
    async with terminal(deployed, pod) as ws:
        screen = Screen(ws)
        await ws.send(b"stty size; echo sized\r")
        await screen.until("24 80")
        await ws.send(json.dumps({"type": "resize", "cols": 132, "rows": 43}))
        await ws.send(b"stty size\r")
        await screen.until("43 132")
        # Printed by the sleep's own process: by then it is the terminal's foreground job.
        await ws.send(b"sh -c 'echo sleep-$((1+1)); exec sleep 600'; echo slept\r")
        await screen.until("sleep-2\r\n")
        await ws.send(b"\x03")  # Ctrl-C ends the sleep, not the shell
        await ws.send(b"echo after-$((6*7))\r")
        await screen.until("after-42")
        await ws.send(b"exit 7\r")
        assert await screen.exit_status() == 7
    assert "\nslept" not in screen.text  # only as typed: the sleep was interrupted


async def test_kiln_shell_cmd_exits_with_the_commands_status(
    deployed: Platform, tmp_path: Path
) -> None:
    env = {"KILN_URL": deployed.url, "KILN_API_KEY": deployed.key, "KILN_HOME": str(tmp_path)}

    def kiln_cli(*args: str) -> Result:
        return CliRunner().invoke(cli, list(args), env=env)

    result = await asyncio.to_thread(
        kiln_cli, "shell", "workbench/work", "--cmd", "echo from-cli; exit 5"
    )
    assert result.exit_code == 5, result.output
    assert "from-cli" in result.output
    # A pod, by the same commands: made, listed, a command in it, removed.
    made = await asyncio.to_thread(kiln_cli, "pods", "create", "--app", "workbench", "--name",
                                   "cli-pod", "--port", "9000")  # fmt: skip
    assert made.exit_code == 0, made.output
    assert made.output.startswith("pod cli-pod (")
    assert f"{deployed.url}/v1/pods/" in made.output
    listed = await asyncio.to_thread(kiln_cli, "pods", "ls")
    header, *rows = listed.output.splitlines()
    assert header.split() == ["NAME", "ID", "KIND", "STATE", "GPU", "PORTS", "FUNCTION"]
    (row,) = [r.split() for r in rows if r.startswith("cli-pod ")]
    assert (row[2], row[4], row[5], row[6]) == ("pod", "none", "9000", "workbench/work")
    ran = await asyncio.to_thread(kiln_cli, "pods", "ssh", "cli-pod", "--cmd", "exit 4")
    assert ran.exit_code == 4, ran.output
    removed = await asyncio.to_thread(kiln_cli, "pods", "rm", "cli-pod")
    assert removed.output.strip() == "pod cli-pod ended"
    unknown = await asyncio.to_thread(kiln_cli, "pods", "stop", "cli-pod")
    assert unknown.exit_code != 0


async def test_shells_are_refused_by_name_and_kept_from_other_customers(
    deployed: Platform,
) -> None:
    async with deployed.client() as client:
        missing = await client.post("/v1/pods", json={"shell": "workbench/nothing"})
        assert missing.status_code == 404, missing.text
        bad = await client.post("/v1/pods", json={"shell": "no-slash"})
        assert bad.status_code == 400
        assert "shell=" in error_of(bad)["message"]
        customer = await client.post(
            "/v1/customers", json={"name": "other-shell-co", "tier": "enterprise"}
        )
        key = await client.post(
            "/v1/keys", json={"kind": "account", "customer_id": customer.json()["id"]}
        )
        other_key = key.json()["key"]
    pod = await new_shell(deployed)
    headers = {"Authorization": f"Bearer {other_key}"}
    async with deployed.client() as client:
        seen = await client.get(f"/v1/pods/{pod['id']}", headers=headers)
        assert seen.status_code == 404
        listed = await client.get("/v1/pods", headers=headers)
        assert listed.json()["data"] == []
    url = deployed.url.replace("http://", "ws://") + pod["terminal"]
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, additional_headers=headers, open_timeout=30):
            pass
    assert refused.value.response.status_code == 404
    with pytest.raises(InvalidStatus) as sized:
        async with terminal(deployed, pod, cols="0"):
            pass
    assert sized.value.response.status_code == 400
    async with deployed.client() as client:
        gone = await client.delete(f"/v1/pods/{pod['id']}")
        assert gone.status_code == 204
        after = await client.get(f"/v1/pods/{pod['id']}")
        assert after.json()["state"] == "ended"


# Two servers a pod runs: HTTP on 8765 (it says what it was asked), a WebSocket echo on 8766.
SERVERS = r"""
import http.server, sys, threading
from websockets.sync.server import serve

class Echo(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        text = (f"{self.command} {self.path} auth={self.headers.get('Authorization')} "
                f"prefix={self.headers.get('X-Forwarded-Prefix')} body={body.decode()}")
        self.send_response(201 if self.command == "POST" else 200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text.encode())
    do_GET = do_POST = _answer

def echo(ws):
    for message in ws:
        ws.send("echo:" + message if isinstance(message, str) else message[::-1])

threading.Thread(target=serve(echo, "127.0.0.1", 8766).serve_forever, daemon=True).start()
http.server.HTTPServer(("127.0.0.1", 8765), Echo).serve_forever()
"""


async def test_a_pods_ports_answer_through_the_router_and_stop_and_start_renew_it(
    deployed: Platform, engine: AsyncEngine
) -> None:
    async with deployed.client() as client:
        made = await client.post("/v1/pods", json={
            "environment": {"app": "workbench"}, "ports": [8765, 8766], "name": "box",
            "volume_gb": 1,
        })  # fmt: skip
        assert made.status_code == 201, made.text
        pod = made.json()
        assert (pod["kind"], pod["name"], pod["ports"]) == ("pod", "box", [8765, 8766])
        again = await client.post("/v1/pods", json={"environment": {"app": "workbench"},
                                                    "name": "box"})  # fmt: skip
        assert again.status_code == 409
    # Start the servers so that they outlive the terminal (a session of their own).
    script = "cat > /tmp/servers.py <<'EOF'\n" + SERVERS + "\nEOF\n"
    start = script + (
        "setsid -f python3 /tmp/servers.py >/tmp/servers.log 2>&1 </dev/null\n"
        "for i in $(seq 100); do python3 -c 'import socket; "
        'socket.create_connection(("127.0.0.1", 8766))\' 2>/dev/null && exit 0; sleep 0.1; done\n'
        "cat /tmp/servers.log; exit 1"
    )
    async with terminal(deployed, pod, cmd=start) as ws:
        screen = Screen(ws)
        assert await screen.exit_status(within_s=120) == 0, screen.text
    base = f"/v1/pods/{pod['id']}/ports"
    async with deployed.client() as client:

        async def answering() -> Any:
            got = await client.get(f"{base}/8765/hello?x=1")
            assert got.status_code == 200, got.text
            return got

        got = await eventually(answering, within_s=30)
        assert got.text == (f"GET {base}/8765/hello?x=1 auth=None prefix={base}/8765 body=")
        posted = await client.post(f"{base}/8765/form", content=b"a=1")
        assert (posted.status_code, posted.text.split(" ")[0]) == (201, "POST")
        assert posted.text.endswith("body=a=1")
        missing = await client.get(f"{base}/9999/")
        assert missing.status_code == 404
        assert "its ports: 8765, 8766" in error_of(missing)["message"]
    url = deployed.url.replace("http://", "ws://")
    headers = {"Authorization": f"Bearer {deployed.key}"}
    async with connect(f"{url}{base}/8766/socket", additional_headers=headers) as ws:
        await ws.send("hi")
        assert await ws.recv() == "echo:hi"
        await ws.send(b"abc")
        assert await ws.recv() == b"cba"
    async with connect(f"{url}/v1/pods/{pod['id']}/tunnel/8765", additional_headers=headers) as raw:
        await raw.send(b"GET /raw HTTP/1.0\r\n\r\n")
        answer = b""
        with contextlib.suppress(ConnectionClosed):
            while True:
                answer += await raw.recv()  # type: ignore[operator]
    assert answer.startswith(b"HTTP/1.0 200")
    assert answer.endswith(b"GET /raw auth=None prefix=None body=")

    # `kiln pods forward`: a local port carried to the pod's, whatever the path.
    listener = socket.create_server(("127.0.0.1", 0))
    local = listener.getsockname()[1]
    stop_forwarding = threading.Event()
    with kiln_client(url=deployed.url, api_key=deployed.key) as sync_client:
        forwarding = threading.Thread(
            target=forward_port, args=(sync_client, pod["id"], 8765, listener, stop_forwarding)
        )
        forwarding.start()
        try:
            fetched = await asyncio.to_thread(_http_get, local, "/any/path")
        finally:
            stop_forwarding.set()
            await asyncio.to_thread(forwarding.join, 10)
    assert fetched.startswith(b"HTTP/1.0 200")
    assert fetched.endswith(b"GET /any/path auth=None prefix=None body=")

    # Its volume is its home, kept across stop and start on its node, and of the size asked
    # for (where the agent can mount one: root, with loop devices).
    sized = (
        "echo kept > ~/note.txt; fallocate -l 2G ~/big 2>&1 | grep -c 'No space left'; "
        'rm -f ~/big; df -B1M --output=size ~ | tail -1; echo "$POD_VOLUME"'
    )
    async with terminal(deployed, pod, cmd=sized) as ws:
        kept = Screen(ws)
        assert await kept.exit_status() == 0, kept.text
    refused, size_mb, path = kept.text.split()
    volume = Path(path)
    assert volume == deployed.settings.home / "node" / "volumes" / pod["id"]
    if os.geteuid() == 0 and Path("/dev/loop-control").exists():
        assert refused == "1"  # 2 GB do not fit in a volume of 1
        assert 900 < int(size_mb) <= 1024

    # Stopped: its replica goes; its ports answer 409; started: a new replica, fresh.
    async with deployed.client() as client:
        stopped = await client.post(f"/v1/pods/{pod['id']}/stop")
        assert stopped.json()["state"] == "stopped"
        assert (await client.get(f"{base}/8765/x")).status_code == 409
        first = pod["replica_id"]

        async def gone() -> bool:
            return first not in {r["id"] for r in await deployed.replicas("workbench/work")}

        await eventually(gone, within_s=30)
        started = await client.post(f"/v1/pods/{pod['id']}/start")
        assert started.json()["replica_id"] != first
        assert (await client.post(f"/v1/pods/{pod['id']}/start")).status_code == 409

        async def running() -> bool:
            view: dict[str, str] = (await client.get(f"/v1/pods/{pod['id']}")).json()
            return view["state"] == "running"

        await eventually(running, within_s=60)
        async with terminal(
            deployed, pod, cmd="cat ~/note.txt; test -e /tmp/servers.py || echo fresh"
        ) as ws:
            after = Screen(ws)
            assert await after.exit_status() == 0
        assert after.text.split() == ["kept", "fresh"]  # the volume stayed; /tmp is new
        # The billed time of the first replica: its whole life, once.
        async with engine.connect() as conn:
            seconds = await conn.scalar(
                sa.select(sa.func.sum(UsageEvent.duration_ms)).where(
                    UsageEvent.replica_id == uuid.UUID(first)
                )
            )
        assert seconds is not None
        assert seconds > 0
        assert (await client.delete(f"/v1/pods/{pod['id']}")).status_code == 204

    async def dropped() -> bool:
        return not await asyncio.to_thread(volume.exists)

    await eventually(dropped, within_s=30)  # an ended pod's volume goes from its node


def _http_get(port: int, path: str) -> bytes:
    """A whole HTTP/1.0 exchange on 127.0.0.1:`port`."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        answer = b""
        while data := conn.recv(65536):
            answer += data
    return answer

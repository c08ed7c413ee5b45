"""Shells and pods on the real stack, in the sandbox, reached only through the router.

A shell is a fresh replica of a function: its terminal is a real PTY (the window's size,
Ctrl-C, the function's environment), the command's exit status comes back, the replica goes
when the terminal ends and its time is billed like any replica's. A pod holds its replica
until it is stopped: servers started in it answer through the router on its forwarded ports
(HTTP, WebSocket, a raw TCP tunnel), and stop and start give it a new replica."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import sqlalchemy as sa
from eventually import eventually
from sqlalchemy.ext.asyncio import AsyncEngine
from stack import Platform, error_of
from test_console_accounts import fresh_email, post_form, register
from typer.testing import CliRunner, Result
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from kiln.cli.main import app as cli
from kiln.cli.pods import forward_port
from kiln.client import connect as kiln_client
from kiln.db.bootstrap import ensure_console_operator
from kiln.db.models import Pod, UsageEvent
from kiln.errors import KilnError
from kiln.functions.package import package
from kiln.invoker.containers import docker_support
from kiln.router.bodies import PodBody
from kiln.router.validation import validated

pytestmark = pytest.mark.integration

WORK = """
import kiln

app = kiln.App("workbench")


@app.function(gpu="none", env={"GREETING": "hello from the function"})
def work(x: int) -> int:
    return x
"""


# Where pods' volumes are file systems of their size (the agent is root, with loop devices).
LOOP_DEVICES = Path("/dev/loop-control").exists()


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
                                   "cli-pod", "--port", "9000", "--pip", "tabulate",
                                   "--auto-stop-hours", "2")  # fmt: skip
    assert made.exit_code == 0, made.output
    assert made.output.startswith("pod cli-pod (")
    assert f"{deployed.url}/v1/pods/" in made.output
    listed = await asyncio.to_thread(kiln_cli, "pods", "ls")
    header, *rows = listed.output.splitlines()
    assert header.split() == ["NAME", "ID", "KIND", "STATE", "GPU", "PORTS", "FUNCTION"]
    (row,) = [r.split() for r in rows if r.startswith("cli-pod ")]
    assert (row[2], row[4], row[5], row[6]) == ("pod", "none", "9000", "workbench/work")
    ran = await asyncio.to_thread(
        kiln_cli, "pods", "ssh", "cli-pod", "--cmd", 'python -c "import tabulate" && exit 4'
    )
    assert ran.exit_code == 4, ran.output  # its requirement was there (else: exit 1)
    shown = await asyncio.to_thread(kiln_cli, "pods", "ls", "--json")
    (mine,) = [p for p in json.loads(shown.output) if p["name"] == "cli-pod"]
    assert (mine["requirements"], mine["auto_stop_hours"]) == (["tabulate"], 2.0)
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
                f"cookie={self.headers.get('Cookie')} "
                f"prefix={self.headers.get('X-Forwarded-Prefix')} body={body.decode()}")
        self.send_response(201 if self.command == "POST" else 200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Set-Cookie", "kiln_session=planted; Path=/")
        self.send_header("Set-Cookie", "theirs=2; Path=/")
        self.send_header("Set-Cookie", "also=3; Path=/")
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
    created = time.monotonic()
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
    serving = time.monotonic()  # its replica runs from here at the latest
    base = f"/v1/pods/{pod['id']}/ports"
    async with deployed.client() as client:

        async def answering() -> Any:
            got = await client.get(f"{base}/8765/hello?x=1")
            assert got.status_code == 200, got.text
            return got

        got = await eventually(answering, within_s=30)
        assert (
            got.text == f"GET {base}/8765/hello?x=1 auth=None cookie=None prefix={base}/8765 body="
        )
        # Kiln's cookies stay out of the pod, the pod's own pass both ways; the pod cannot set
        # Kiln's.
        cookies = await client.get(f"{base}/8765/c", headers={
            "Cookie": "kiln_session=s3cret; theirs=1; kiln_viewing=x; kiln_csrf=y",
        })  # fmt: skip
        assert " cookie=theirs=1 " in cookies.text
        assert cookies.headers.get_list("set-cookie") == ["theirs=2; Path=/", "also=3; Path=/"]
        posted = await client.post(f"{base}/8765/form", content=b"a=1")
        assert (posted.status_code, posted.text.split(" ")[0]) == (201, "POST")
        assert posted.text.endswith("body=a=1")
        worker = await client.get(f"{base}/8765/sw.js", headers={"Service-Worker": "script"})
        assert worker.status_code == 403  # no pod page may take the router's origin over
        assert error_of(worker)["message"].startswith("a pod's page cannot register a service")
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
    assert answer.endswith(b"GET /raw auth=None cookie=None prefix=None body=")

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
    assert fetched.endswith(b"GET /any/path auth=None cookie=None prefix=None body=")

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
    if os.geteuid() == 0 and LOOP_DEVICES:
        assert refused == "1"  # 2 GB do not fit in a volume of 1
        assert 900 < int(size_mb) <= 1024

    # Stopped: its replica goes; its ports answer 409; started: a new replica, fresh.
    async with deployed.client() as client:
        stopping = time.monotonic()
        stopped = await client.post(f"/v1/pods/{pod['id']}/stop")
        assert stopped.json()["state"] == "stopped"
        assert (await client.get(f"{base}/8765/x")).status_code == 409
        first = pod["replica_id"]

        async def gone() -> bool:
            return first not in {r["id"] for r in await deployed.replicas("workbench/work")}

        await eventually(gone, within_s=30)
        ended = time.monotonic()
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

        # The billed time of the first replica: its whole life, once: at least from when it
        # certainly ran to its stop, at most from the pod's creation to its replica's end.
        async def billed_ms() -> int:
            async with engine.connect() as conn:
                total = await conn.scalar(
                    sa.select(sa.func.sum(UsageEvent.duration_ms)).where(
                        UsageEvent.replica_id == uuid.UUID(first)
                    )
                )
            assert total is not None
            assert total >= (stopping - serving) * 1000
            return int(total)

        assert await eventually(billed_ms, within_s=30) <= (ended - created) * 1000
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


async def test_a_pod_of_requirements_gets_them_from_its_node_over_the_platforms_python(
    deployed: Platform,
) -> None:
    """No app named: the customer's `pod-env` app carries it; its node builds an environment
    of the requirements (wheels only) that the pod's `python` and `pip` are."""
    async with deployed.client() as client:
        made = await client.post("/v1/pods", json={
            "environment": {"requirements": ["tabulate"]}, "name": "reqs",
        })  # fmt: skip
        assert made.status_code == 201, made.text
        pod = made.json()
        assert (pod["function"], pod["requirements"]) == ("pod-env/environment", ["tabulate"])
        apps = (await client.get("/v1/apps")).json()["apps"]
        assert "pod-env" in {a["name"] for a in apps}
    check = (
        'python -c "import tabulate, kiln; print(tabulate.tabulate([[1, 2]]))"; '
        'test "$(command -v python)" = "$VIRTUAL_ENV/bin/python" && echo own-python; '
        "touch $VIRTUAL_ENV/x 2>/dev/null || echo read-only"
    )
    async with terminal(deployed, pod, cmd=check) as ws:
        screen = Screen(ws)
        assert await screen.exit_status(within_s=120) == 0, screen.text
    assert "-  -\n1  2\n-  -" in screen.text.replace("\r\n", "\n")
    assert "own-python" in screen.text
    assert "read-only" in screen.text  # the environment is the node's, shared, not the pod's
    async with deployed.client() as client:
        # Its app is not deleted under it; once it ended, the app goes and its row stays.
        kept = await client.delete("/v1/apps/pod-env")
        assert (kept.status_code, error_of(kept)["message"]) == (409, (
            "app 'pod-env' is the environment of pods that have not ended: reqs; end them "
            "first (kiln pods rm NAME)"
        ))  # fmt: skip
        assert (await client.delete(f"/v1/pods/{pod['id']}")).status_code == 204
        assert (await client.delete("/v1/apps/pod-env")).status_code == 204
        ended = (await client.get(f"/v1/pods/{pod['id']}")).json()
        assert (ended["state"], ended["function"]) == ("ended", None)


async def test_requirements_are_refused_by_name() -> None:
    """Each refusal says what is wrong and what is allowed (no platform needed for these)."""

    def refusal(environment: Any) -> str:
        with pytest.raises(KilnError) as caught:
            validated(PodBody, {"environment": environment})
        return caught.value.message

    assert refusal({}) == (
        'environment={} is not valid: expected {"app": APP}, {"requirements": [...]} or both'
    )
    assert refusal({"requirements": ["numpy>>2"]}).startswith(
        "requirements: 'numpy>>2' is not a Python requirement ("
    )
    assert refusal({"requirements": ["evil @ https://example.com/evil.whl"]}) == (
        "requirements: 'evil @ https://example.com/evil.whl' names a URL; pods install "
        "packages by name from the platform's package index only"
    )
    with pytest.raises(KilnError) as both:
        validated(PodBody, {"image": "ubuntu:24.04", "environment": {"app": "x"}})
    assert both.value.message == (
        "a pod needs exactly one of shell (APP/NAME), environment "
        '({"app": APP}, {"requirements": [...]} or both) or image (a container image)'
    )
    with pytest.raises(KilnError) as bad_image:
        validated(PodBody, {"image": "Not An Image"})
    assert bad_image.value.message == (
        "image='Not An Image' is not valid: expected a container image reference such as "
        "'ubuntu:24.04' or 'ghcr.io/org/image@sha256:...' (lowercase, up to 255 characters)"
    )
    assert refusal({"requirements": "numpy"}) == (
        "environment='numpy' is not valid: expected {\"app\": APP} (one of your deployed apps), "
        '{"requirements": [...]} or both'
    )


# A browser's way in: the console's session cookie, for the pods of the user's own customer.


@dataclass
class Lab:
    """A customer signed up in the console (`browser` holds its session and sends the
    platform's Origin, as its pages do), its key, and its pod forwarding port 8888."""

    browser: httpx.AsyncClient
    key: str
    pod: dict[str, Any]

    @property
    def base(self) -> str:
        return f"/v1/pods/{self.pod['id']}/ports/8888"

    def ws_url(self, platform: Platform, path: str) -> str:
        return platform.url.replace("http://", "ws://") + self.base + path

    def cookies(self) -> str:
        """The browser's cookies as its Cookie header (Kiln's and the pod's)."""
        return "; ".join(f"{c.name}={c.value}" for c in self.browser.cookies.jar)


@pytest.fixture(scope="module", name="lab")
async def customer_lab(
    platform: Platform, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Lab]:
    async with httpx.AsyncClient(
        base_url=platform.url, headers={"Origin": platform.url}, timeout=60
    ) as browser:
        await register(platform, browser, fresh_email())
        made = await post_form(browser, "/console/keys", {"action": "create", "name": "lab"})
        found = re.search(r'<code id="new-key">([^<]+)</code>', made.text)
        assert found is not None
        key = found.group(1)
        source = tmp_path_factory.mktemp("lab") / "workbench.py"
        source.write_text(WORK)
        async with httpx.AsyncClient(
            base_url=platform.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as api:
            customer_id = (await api.get("/v1/billing/balance")).json()["customer_id"]
            async with platform.client() as operator:
                credited = await operator.post("/v1/billing/credits", json={
                    "customer_id": customer_id, "amount_micros": 10**8,
                })  # fmt: skip
                assert credited.status_code == 201, credited.text
            deployed = await api.post("/v1/apps", json=package(source).deploy_body())
            assert deployed.status_code in (200, 201), deployed.text
            pod = await api.post("/v1/pods", json={
                "environment": {"app": "workbench"}, "ports": [8888], "name": "lab",
            })  # fmt: skip
            assert pod.status_code == 201, pod.text
            try:
                yield Lab(browser, key, pod.json())
            finally:
                await api.delete(f"/v1/pods/{pod.json()['id']}")


SIGN_IN = (
    "sign in to the console to open a pod's port, or pass an API key as "
    "`Authorization: Bearer kiln_...`"
)
ELSEWHERE = {"Origin": "https://elsewhere.example"}


async def test_a_console_session_opens_its_customers_pod_ports_from_its_own_pages(
    deployed: Platform, lab: Lab
) -> None:
    platform = deployed
    listed = await lab.browser.get("/console/pods")
    assert f'href="{lab.base}/"' in listed.text

    # Signed in, from the platform's pages: through to the pod (where nothing listens yet).
    got = await lab.browser.get(f"{lab.base}/")
    assert (got.status_code, error_of(got)["code"]) == (502, "bad_gateway"), got.text
    posted = await lab.browser.post(f"{lab.base}/form", content=b"x")
    assert posted.status_code == 502, posted.text

    # Nobody signed in, a session that ended, and a page of another site.
    async with httpx.AsyncClient(base_url=platform.url, timeout=60) as anyone:
        nobody = await anyone.get(f"{lab.base}/")
        assert (nobody.status_code, error_of(nobody)["message"]) == (401, SIGN_IN)
        anyone.cookies.set("kiln_session", "x" * 43)
        ended = await anyone.get(f"{lab.base}/")
        assert ended.status_code == 401
        assert error_of(ended)["message"].startswith("your console session has ended: sign in")
    forged = await lab.browser.post(f"{lab.base}/form", content=b"x", headers=ELSEWHERE)
    assert forged.status_code == 403
    assert error_of(forged)["message"] == (
        "this request came from another site (its Origin is not the platform's): a pod's port "
        "takes the console's session only from the platform's own pages; or pass an API key "
        "as `Authorization: Bearer kiln_...`"
    )
    with pytest.raises(InvalidStatus) as hijacked:
        async with connect(lab.ws_url(platform, "/socket"), open_timeout=30,
                           additional_headers={"Cookie": lab.cookies(), **ELSEWHERE}):  # fmt: skip
            pass
    assert hijacked.value.response.status_code == 403

    # Another customer's user does not see the pod. Nor does an operator's session: a
    # customer's pages must not run with an operator's rights. It opens the platform's own
    # pods (made with an operator key).
    async with httpx.AsyncClient(
        base_url=platform.url, headers={"Origin": platform.url}, timeout=60
    ) as other:
        await register(platform, other, fresh_email())
        assert (await other.get(f"{lab.base}/")).status_code == 404
    email = fresh_email()
    password = await ensure_console_operator(platform.settings, email)
    assert password is not None
    async with platform.client() as client:
        made = await client.post("/v1/pods", json={
            "environment": {"app": "workbench"}, "ports": [8888], "name": "operators",
        })  # fmt: skip
        assert made.status_code == 201, made.text
    own = made.json()["id"]
    async with httpx.AsyncClient(
        base_url=platform.url, headers={"Origin": platform.url}, timeout=60
    ) as operator:
        signed = await post_form(operator, "/console/login", {"email": email, "password": password})
        assert signed.status_code == 303
        assert (await operator.get(f"{lab.base}/")).status_code == 404
        reached = await operator.get(f"/v1/pods/{own}/ports/8888/")
        assert reached.status_code == 502, reached.text
    async with platform.client() as client:
        assert (await client.delete(f"/v1/pods/{own}")).status_code == 204


async def test_jupyter_through_the_router_with_a_key_and_with_the_console_session(
    platform: Platform, lab: Lab
) -> None:
    missing = [m for m in ("jupyter_server", "ipykernel") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not installed (the pod runs the platform's Python): "
            "`make setup` or `.venv/bin/pip install -e '.[test]'` installs them"
        )
    token = secrets.token_hex(16)
    start = (
        "export JUPYTER_RUNTIME_DIR=/tmp/jupyter JUPYTER_DATA_DIR=/tmp/jupyter "
        "JUPYTER_CONFIG_DIR=/tmp/jupyter IPYTHONDIR=/tmp/ipython\n"
        "setsid -f python3 -m jupyter_server --allow-root --ServerApp.ip=127.0.0.1 "
        f"--ServerApp.port=8888 --ServerApp.port_retries=0 --ServerApp.base_url={lab.base}/ "
        f"--IdentityProvider.token={token} --ServerApp.root_dir=/tmp "
        ">/tmp/jupyter.log 2>&1 </dev/null\n"
        "for i in $(seq 300); do python3 -c 'import socket; "
        'socket.create_connection(("127.0.0.1", 8888))\' 2>/dev/null && exit 0; sleep 0.1; done\n'
        "cat /tmp/jupyter.log; exit 1"
    )
    async with terminal(platform, lab.pod, cmd=start) as ws:
        screen = Screen(ws)
        assert await screen.exit_status(within_s=60) == 0, screen.text

    # A script: the API key for Kiln, Jupyter's token in the URL (the key's header stays out).
    key = {"Authorization": f"Bearer {lab.key}"}
    async with httpx.AsyncClient(base_url=platform.url, headers=key, timeout=60) as api:
        status = await api.get(f"{lab.base}/api/status", params={"token": token})
        assert status.status_code == 200, status.text
        assert "started" in status.json()
        kernel = await api.post(
            f"{lab.base}/api/kernels", params={"token": token}, json={"name": "python3"}
        )
        assert kernel.status_code == 201, kernel.text
    channels = lab.ws_url(platform, f"/api/kernels/{kernel.json()['id']}/channels")
    async with connect(f"{channels}?token={token}", open_timeout=30, additional_headers=key) as ws:
        assert await run_in_kernel(ws, "1+1") == "2"

    # A browser: the console's session for Kiln; Jupyter's token once, then its own login
    # cookie and its XSRF token (cookie and header), all passed through untouched.
    browser = lab.browser
    host = httpx.URL(platform.url).host
    browser.cookies.set("_xsrf", "xsrf-from-the-page", domain=host, path=f"{lab.base}/")
    signed = await browser.get(f"{lab.base}/api/status", params={"token": token})
    assert signed.status_code == 200, signed.text
    assert any(c.name.startswith("username-") for c in browser.cookies.jar)  # Jupyter's login
    unguarded = await browser.post(f"{lab.base}/api/kernels", json={"name": "python3"})
    assert unguarded.status_code == 403  # Jupyter's own XSRF check, without its header
    kernel = await browser.post(
        f"{lab.base}/api/kernels",
        json={"name": "python3"},
        headers={"X-XSRFToken": "xsrf-from-the-page"},
    )
    assert kernel.status_code == 201, kernel.text
    channels = lab.ws_url(platform, f"/api/kernels/{kernel.json()['id']}/channels")
    async with connect(channels, open_timeout=30, additional_headers={
        "Cookie": lab.cookies(), "Origin": platform.url,
    }) as ws:  # fmt: skip
        assert await run_in_kernel(ws, "1+1") == "2"


async def run_in_kernel(ws: ClientConnection, code: str) -> str:
    """Execute `code` on a Jupyter kernel's channels: its result as text."""
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "msg_type": "execute_request", "username": "kiln", "version": "5.3",
              "session": uuid.uuid4().hex, "date": datetime.now(UTC).isoformat()}  # fmt: skip
    content = {"code": code, "silent": False, "store_history": False, "user_expressions": {},
               "allow_stdin": False, "stop_on_error": True}  # fmt: skip
    await ws.send(json.dumps({"header": header, "parent_header": {}, "metadata": {},
                              "content": content, "channel": "shell", "buffers": []}))  # fmt: skip
    async with asyncio.timeout(60):
        while True:
            message = json.loads(await ws.recv())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "error":
                raise AssertionError(message["content"])
            if message["msg_type"] == "execute_result":
                return str(message["content"]["data"]["text/plain"])


def _container_image(tmp: Path) -> str:
    """A small image made here (no registry is needed): busybox as its whole root."""
    busybox = shutil.which("busybox")
    if busybox is None or not docker_support()[0]:
        pytest.skip(
            "container pods need a Docker daemon and a static busybox to make a test image "
            "(apt-get install docker.io busybox-static; dockerd running)"
        )
    root = tmp / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "tmp").mkdir()
    shutil.copy(busybox, root / "bin" / "busybox")
    for tool in ("sh", "echo", "cat", "mkdir", "httpd", "hostname", "sleep", "ls"):
        (root / "bin" / tool).symlink_to("busybox")
    archive = tmp / "rootfs.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(archive), "."], check=True)
    subprocess.run(
        ["docker", "import", "--change", 'CMD ["sh"]', str(archive), "kiln-test/busybox:pods"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return "kiln-test/busybox:pods"


async def test_a_container_pod_runs_its_image_with_a_terminal_ports_and_a_volume(
    deployed: Platform, tmp_path: Path
) -> None:
    image = await asyncio.to_thread(_container_image, tmp_path)
    async with deployed.client() as client:
        made = await client.post("/v1/pods", json={
            "image": image, "ports": [8080], "volume_gb": 1, "name": "boxed",
        })  # fmt: skip
        assert made.status_code == 201, made.text
        pod = made.json()
        assert (pod["image"], pod["function"]) == (image, "pod-env/environment")
    base = f"/v1/pods/{pod['id']}/ports/8080"
    # In the container: its own root (busybox's, not the host's), the volume at /workspace,
    # and a server whose port the router reaches.
    serve = (
        f"mkdir -p /www{base} && echo served > /www{base}/index.html && httpd -p 8080 -h /www; "
        "ls /usr 2>&1 | head -1; echo kept > /workspace/note; cat /workspace/note; exit 6"
    )
    async with terminal(deployed, pod, cmd=serve) as ws:
        screen = Screen(ws)
        assert await screen.exit_status(within_s=120) == 6, screen.text
    assert "No such file or directory" in screen.text  # no /usr: the image's root, not the host's
    assert "kept" in screen.text
    async with deployed.client() as client:

        async def answering() -> str:
            got = await client.get(f"{base}/index.html")
            assert got.status_code == 200, got.text
            return got.text

        assert await eventually(answering, within_s=30) == "served\n"
        # An interactive shell in the container: its prompt, a command, its exit status.
        async with terminal(deployed, pod) as ws:
            shell = Screen(ws)
            await shell.until("# ")  # its prompt: it reads what is typed from here
            await ws.send(b"echo in-$((1+1))-containers; exit 4\r")
            assert await shell.exit_status(within_s=30) == 4, shell.text
        assert "in-2-containers" in shell.text  # what it printed, not what was typed
        assert (await client.delete(f"/v1/pods/{pod['id']}")).status_code == 204

        # An image its node cannot run: the pod's replica fails to start, and the pod says why.
        missing = await client.post("/v1/pods", json={"image": "kiln-test/none:missing"})
        assert missing.status_code == 201, missing.text

        async def refused() -> str:
            view = (await client.get(f"/v1/pods/{missing.json()['id']}")).json()
            assert view["error"], view
            return str(view["error"])

        error = await eventually(refused, within_s=60)
        assert error.startswith("its replica failed to start (1 in a row; at 3 it stops): ")
        assert "the pod's image could not be run: " in error
        assert (await client.delete(f"/v1/pods/{missing.json()['id']}")).status_code == 204


async def test_pods_asking_for_what_no_node_has_or_reserved_ports_are_refused_by_name(
    deployed: Platform,
) -> None:
    async def refusal(body: dict[str, Any]) -> tuple[int, str]:
        async with deployed.client() as client:
            answer = await client.post("/v1/pods", json={"environment": {"app": "workbench"},
                                                         **body})  # fmt: skip
        return answer.status_code, str(error_of(answer)["message"])

    # B200s: no test's node has them (the other modules' nodes may be in the database too, so
    # what "the nodes have" lists depends on which ran before: it names at least this one's).
    for gpu, count, asked in (("B200", None, "B200"), ("B200", 8, "B200:8")):
        status, message = await refusal({"gpu": gpu, **({"gpu_count": count} if count else {})})
        assert status == 400
        assert message.startswith(f"gpu={asked!r}: no node has that; the nodes have "), message
        assert "CPU slots" in message
    assert await refusal({"gpu": "H100", "gpu_count": 64}) == (
        400,
        "gpu_count=64 is not valid: expected a whole number of GPUs from 1 to 16",
    )
    status, message = await refusal({"gpu": "Z9000"})
    assert (status, message.startswith("gpu='Z9000' is not valid: ")) == (400, True), message
    for ports in ([80], [70000]):
        status, message = await refusal({"ports": ports})
        assert status == 400
        assert message.endswith(
            "expected at most 10 port numbers from 1024 to 65535 (ports below 1024 are "
            "reserved: a pod's programs run unprivileged)"
        ), message
    assert await refusal({"ports": [8000, 8000]}) == (
        400,
        "ports=(8000, 8000) is not valid: a port is named twice",
    )
    assert await refusal({"environment": {"requirements": ["x; os_name == '${KILN_KEY}'"]}}) == (
        400,
        "requirements: \"x; os_name == '${KILN_KEY}'\" has a '$' or a character that does "
        "not print; expected a name with optional extras, versions and markers, such as "
        "'numpy>=2'",
    )

"""`kiln pods …`: pods, slots held until they are stopped (`/v1/pods`).

A pod is named by its id or its name. `ssh` opens its terminal (as `kiln shell` does);
`forward` listens on a local port and carries each connection to the pod's port through the
router (`WS /v1/pods/ID/tunnel/PORT`), so anything that speaks TCP reaches it, paths and all.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import threading
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kiln.cli.output import JsonFlag, echo_json, echo_table
from kiln.cli.shell import run_terminal
from kiln.errors import InvalidRequest

if TYPE_CHECKING:
    from websockets.sync.client import ClientConnection

    from kiln.client import Client

__all__ = ["forward_port", "pods_app"]

pods_app = typer.Typer(
    help="Pods: GPUs held until stopped, with a terminal, forwarded ports and a volume.",
    no_args_is_help=True,
)
PodArg = Annotated[str, typer.Argument(metavar="POD", help="The pod's id or name.")]
_CHUNK = 64 * 1024


def _client() -> Client:
    from kiln.client import connect

    return connect()


def _pod(client: Client, key: str) -> dict[str, Any]:
    """The pod whose id or name is `key`."""
    pods: list[dict[str, Any]] = client.request("GET", "/v1/pods").json()["data"]
    for pod in pods:
        if key in (pod["id"], pod["name"]):
            return pod
    names = ", ".join(p["name"] for p in pods) or "none"
    raise InvalidRequest(f"no pod {key!r}; your pods: {names}")


def _show(pod: dict[str, Any]) -> tuple[str, ...]:
    ports = ",".join(map(str, pod["ports"])) or "-"
    return pod["name"], pod["id"], pod["kind"], pod["state"], pod["gpu"], ports, pod["function"]


@pods_app.command("create")
def create(
    app: Annotated[
        str | None, typer.Option("--app", help="A deployed app: its code and environment.")
    ] = None,
    pip: Annotated[
        list[str] | None,
        typer.Option("--pip", help="A Python requirement its node installs (repeatable)."),
    ] = None,
    image: Annotated[
        str | None, typer.Option("--image", help="A container image (nodes with Docker).")
    ] = None,
    gpu: Annotated[str | None, typer.Option("--gpu", help="GPUs, such as H100:2, or none.")] = None,
    port: Annotated[
        list[int] | None, typer.Option("--port", help="A port to forward (repeatable).")
    ] = None,
    volume_gb: Annotated[int, typer.Option("--volume-gb", help="A volume kept across stops.")] = 0,
    auto_stop_hours: Annotated[
        float | None,
        typer.Option("--auto-stop-hours", help="Stop it after this long without traffic."),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="The pod's name.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Start a pod; it holds its GPUs (and is billed) until it is stopped. Its environment is
    an app's (--app), Python requirements (--pip), or both; or it runs a container (--image)."""
    body: dict[str, Any] = {"ports": port or [], "volume_gb": volume_gb}
    if image is not None:
        body["image"] = image
    if app is not None or pip or image is None:
        body["environment"] = {
            **({"app": app} if app is not None else {}),
            **({"requirements": pip} if pip else {}),
        }
    if gpu is not None:
        body["gpu"] = gpu
    if auto_stop_hours is not None:
        body["auto_stop_hours"] = auto_stop_hours
    if name is not None:
        body["name"] = name
    with _client() as client:
        pod = client.request("POST", "/v1/pods", json=body).json()
    if as_json:
        echo_json(pod)
        return
    typer.echo(f"pod {pod['name']} ({pod['id']}) is {pod['state']}")
    for each in pod["ports"]:
        typer.echo(f"  port {each}: {client.url.rstrip('/')}/v1/pods/{pod['id']}/ports/{each}/")


@pods_app.command("ls")
def list_pods(as_json: JsonFlag = False) -> None:
    """Your pods and shells that have not ended."""
    with _client() as client:
        pods = client.request("GET", "/v1/pods").json()["data"]
    if as_json:
        echo_json(pods)
        return
    header = ("NAME", "ID", "KIND", "STATE", "GPU", "PORTS", "FUNCTION")
    echo_table(header, [_show(p) for p in pods])


@pods_app.command("stop")
def stop(pod: PodArg) -> None:
    """Give the pod's GPUs back; the pod and its volume stay."""
    _change(pod, "stop")


@pods_app.command("start")
def start(pod: PodArg) -> None:
    """Start a stopped pod again."""
    _change(pod, "start")


def _change(pod: str, action: str) -> None:
    with _client() as client:
        found = _pod(client, pod)
        view = client.request("POST", f"/v1/pods/{found['id']}/{action}").json()
    typer.echo(f"pod {view['name']} is {view['state']}")


@pods_app.command("rm")
def remove(pod: PodArg) -> None:
    """End the pod: its replica stops and its volume goes."""
    with _client() as client:
        found = _pod(client, pod)
        client.request("DELETE", f"/v1/pods/{found['id']}")
    typer.echo(f"pod {found['name']} ended")


@pods_app.command("ssh")
def ssh(
    pod: PodArg,
    cmd: Annotated[
        str | None, typer.Option("--cmd", help="Run this command and exit with its status.")
    ] = None,
) -> None:
    """A terminal in the pod (or one command, with its exit status)."""
    with _client() as client:
        found = _pod(client, pod)
        size = shutil.get_terminal_size()
        params = {"cols": str(size.columns), "rows": str(size.lines),
                  "term": os.environ.get("TERM") or "xterm-256color"}  # fmt: skip
        if cmd is not None:
            params["cmd"] = cmd
        with client.websocket(found["terminal"], params) as session:
            code = run_terminal(session, interactive=sys.stdin.isatty())
    raise typer.Exit(code)


@pods_app.command("forward")
def forward(
    pod: PodArg,
    port: Annotated[int, typer.Argument(help="The pod's port (one it forwards).")],
    local: Annotated[
        int | None, typer.Option("--local", help="The local port (default: the same).")
    ] = None,
) -> None:
    """Listen on 127.0.0.1:LOCAL and carry each connection to the pod's PORT, until Ctrl-C."""
    with _client() as client:
        found = _pod(client, pod)
        listener = socket.create_server(("127.0.0.1", port if local is None else local))
        bound = listener.getsockname()[1]
        typer.echo(f"forwarding 127.0.0.1:{bound} to port {port} of pod {found['name']}; "
                   "Ctrl-C stops")  # fmt: skip
        with contextlib.suppress(KeyboardInterrupt):
            forward_port(client, found["id"], port, listener, threading.Event())


def forward_port(
    client: Client, pod_id: str, port: int, listener: socket.socket, stop: threading.Event
) -> None:
    """Accept connections on `listener` until `stop` is set; each one is carried to the pod's
    `port` through its own tunnel, in threads of its own."""
    listener.settimeout(0.2)
    with listener:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=_carry, args=(client, pod_id, port, conn), daemon=True).start()


def _carry(client: Client, pod_id: str, port: int, conn: socket.socket) -> None:
    with conn:
        try:
            tunnel = client.websocket(f"/v1/pods/{pod_id}/tunnel/{port}", {})
        except Exception as exc:  # noqa: BLE001 - this connection fails; the others go on
            print(f"kiln pods forward: {exc}", file=sys.stderr)
            return
        with tunnel:
            up = threading.Thread(target=_to_pod, args=(conn, tunnel), daemon=True)
            up.start()
            with contextlib.suppress(Exception):  # either side closing ends it
                for message in tunnel:
                    conn.sendall(message if isinstance(message, bytes) else message.encode())
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def _to_pod(conn: socket.socket, tunnel: ClientConnection) -> None:
    """The local side's bytes to the pod. Its end of writing is not passed on (a tunnel has no
    half-close): the connection ends when the pod's side closes it, or the local one does."""
    with contextlib.suppress(Exception):
        while data := conn.recv(_CHUNK):
            tunnel.send(data)

"""Pods that run a container image, on nodes with Docker (and, for GPUs, the NVIDIA container
toolkit): the node agent runs the container beside the pod's replica, and a gateway lets the
replica, in its sandbox, reach into that one container and nothing else.

The container runs the image's own command (with a TTY on standard input, so an image whose
command is a shell keeps running), its volume at `/workspace`, its GPUs through `--gpus`. Its
replica serves the pod's terminals and forwarded ports as any pod's does; what it runs and
connects to is inside the container, through the gateway: a Unix socket the agent listens on
in the replica's box, which takes three requests, one JSON line each:

- `{"op": "ready"}`: answered once the container runs (the replica is ready only then).
- `{"op": "exec", "argv": [...], "cols", "rows", "term"}`: the agent runs `docker exec -it`
  with that command on a pseudo-terminal of its own and hands the terminal's master end to the
  replica (SCM_RIGHTS); when the command ends, `{"exit": CODE}` follows on the socket.
- `{"op": "connect", "port": N}`: the agent connects to 127.0.0.1:N inside the container's
  network namespace (a thread of its own enters it) and hands the connected socket over.

Both wait until the container runs, answering `{"error": ...}` if it never does (the image
could not be pulled, say). The replica never holds Docker's socket, which is root on the host.
A container that exits takes its pod's replica with it (the pod starts again, as a pod whose
replica died does); the replica's end removes the container.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import pty
import shutil
import socket
import struct
import subprocess
import termios
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.pods.container_exec import short_path

__all__ = ["CONTAINER_START_S", "GATEWAY_SOCKET", "Containers", "docker_support"]

_log = logging.getLogger("kiln.agent.containers")
GATEWAY_SOCKET = "container.sock"  # in the replica's work directory
_CLONE_NEWNET = 0x40000000
CONTAINER_START_S = 30 * 60.0  # `docker run`, which pulls the image first when it must
_CONNECT_TIMEOUT_S = 10.0
_REQUEST_BYTES = 64 * 1024


def docker_support() -> tuple[bool, bool]:
    """Whether this host runs containers (a Docker daemon answers), and GPU containers (its
    runtimes include NVIDIA's)."""
    docker = shutil.which("docker")
    if docker is None:
        return False, False
    try:
        done = subprocess.run(
            [docker, "info", "--format", "{{json .Runtimes}}"],
            capture_output=True, text=True, check=False, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False, False
    if done.returncode != 0:
        return False, False
    return True, "nvidia" in done.stdout


@dataclass
class _Container:
    name: str
    # Once it runs, its network namespace (a descriptor held from its start: a connection
    # enters that one, never that of a process that took the pid of a container gone since).
    started: asyncio.Task[int]
    server: asyncio.Server | None = None
    execs: set[asyncio.Task[None]] = field(default_factory=set)


class Containers:
    def __init__(self, *, node_id: str, on_exit: Callable[[str], None]) -> None:
        """`on_exit(replica_id)`: the pod's container ended by itself (its replica must go)."""
        self.node_id = node_id
        self.on_exit = on_exit
        self._running: dict[str, _Container] = {}

    async def start(
        self,
        replica_id: str,
        image: str,
        *,
        gateway_dir: Path,
        gateway_uid: int | None,
        gpus: list[int],
        volume: Path | None,
        env: dict[str, str],
        memory_mb: int | None,
    ) -> None:
        """Run `image` for the pod whose replica is `replica_id` (in the background: a pull
        may take minutes) and open its gateway in `gateway_dir`."""
        name = f"kiln-{replica_id}"
        argv = ["docker", "run", "--detach", "--interactive", "--tty", "--init", "--name", name,
                "--label", f"kiln.node={self.node_id}", "--label", f"kiln.replica={replica_id}",
                "--security-opt", "no-new-privileges", "--pids-limit", "4096"]  # fmt: skip
        if gpus:
            argv += ["--gpus", f'"device={",".join(map(str, gpus))}"']
        if volume is not None:
            argv += ["--volume", f"{volume}:/workspace", "--env", "POD_VOLUME=/workspace"]
        if memory_mb:
            argv += ["--memory", f"{memory_mb}m"]
        for key, value in env.items():
            argv += ["--env", f"{key}={value}"]
        argv.append(image)
        container = _Container(name, asyncio.create_task(self._run(replica_id, argv)))
        self._running[replica_id] = container
        path = gateway_dir / GATEWAY_SOCKET
        with short_path(path) as name:  # a box's directory is deeper than a socket's name
            container.server = await asyncio.start_unix_server(
                lambda r, w: self._serve(container, r, w), path=name
            )
        if gateway_uid is not None:  # the replica's uid, and nobody else, may open it
            os.chown(path, gateway_uid, gateway_uid)
        os.chmod(path, 0o600)

    async def stop(self, replica_id: str) -> None:
        """The replica ended: its container goes."""
        container = self._running.pop(replica_id, None)
        if container is None:
            return
        if container.server is not None:
            container.server.close()
        container.started.cancel()
        for task in list(container.execs):
            task.cancel()
        results = await asyncio.gather(container.started, *container.execs, return_exceptions=True)
        if isinstance(results[0], int):
            os.close(results[0])
        for _ in range(3):
            failed = await _docker("rm", "--force", container.name)
            if not failed or "No such container" in failed:
                return
            _log.warning("removing container %s: %s", container.name, failed)
        raise RuntimeError(f"container {container.name} could not be removed: {failed}")

    async def remove_stale(self) -> None:
        """Remove the containers this node's agent ran before it restarted: their replicas
        went with it, and they hold GPUs and volumes the new agent hands out."""
        listed = await _docker_output(
            "ps", "--all", "--quiet", "--filter", f"label=kiln.node={self.node_id}"
        )
        for container in listed.split():
            _log.warning("removing container %s, left by this node's previous agent", container)
            await _docker("rm", "--force", container)

    async def close(self) -> None:
        for replica_id in list(self._running):
            await self.stop(replica_id)

    async def _run(self, replica_id: str, argv: list[str]) -> int:
        failed = await _docker(*argv[1:], within_s=CONTAINER_START_S)
        if failed:
            raise RuntimeError(f"the pod's image could not be run: {failed}")
        name = argv[argv.index("--name") + 1]
        pid = await _docker_output("inspect", "--format", "{{.State.Pid}}", name)
        namespace = os.open(f"/proc/{int(pid)}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        task = asyncio.create_task(self._watch(replica_id, name))
        self._running[replica_id].execs.add(task)
        return namespace

    async def _watch(self, replica_id: str, name: str) -> None:
        await _docker("wait", name, within_s=None)
        if replica_id in self._running:
            _log.warning("the container of replica %s exited: the replica goes", replica_id)
            self.on_exit(replica_id)

    async def _serve(
        self, container: _Container, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        container.execs.add(task)
        try:
            request = json.loads(await reader.readline())
            try:
                namespace = await asyncio.shield(container.started)
            except Exception as exc:  # noqa: BLE001 - told to the replica, which fails with it
                await _answer(writer, {"error": str(exc)})
                return
            if request.get("op") == "ready":
                await _answer(writer, {"ok": True})
            elif request.get("op") == "connect":
                await self._connect(namespace, int(request["port"]), writer)
            elif request.get("op") == "exec":
                await self._exec(container.name, request, writer)
            else:
                await _answer(writer, {"error": f"unknown request {request.get('op')!r}"})
        except Exception:  # noqa: BLE001 - one request's failure, the replica hears it closed
            _log.exception("a container gateway request failed")
        finally:
            container.execs.discard(task)
            writer.close()

    async def _connect(self, namespace: int, port: int, writer: asyncio.StreamWriter) -> None:
        try:
            sock = await asyncio.to_thread(_connect_in, namespace, port)
        except OSError as exc:
            await _answer(writer, {"error": f"127.0.0.1:{port} in the pod: {exc}"})
            return
        with sock:
            await _answer(writer, {"ok": True}, fd=sock.fileno())

    async def _exec(self, name: str, request: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        argv = [str(a) for a in request["argv"]]
        master, slave = pty.openpty()
        try:
            _set_size(slave, int(request.get("cols", 80)), int(request.get("rows", 24)))
            process = await asyncio.create_subprocess_exec(
                "docker", "exec", "--interactive", "--tty",
                "--env", f"TERM={request.get('term') or 'xterm-256color'}", name, *argv,
                stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
            )  # fmt: skip
        finally:
            os.close(slave)
        try:
            await _answer(writer, {"ok": True}, fd=master)
        finally:
            os.close(master)  # the replica holds it now
        try:
            code = await process.wait()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise
        await _answer(writer, {"exit": code})


async def _answer(
    writer: asyncio.StreamWriter, message: dict[str, Any], fd: int | None = None
) -> None:
    data = json.dumps(message).encode() + b"\n"
    if fd is None:
        writer.write(data)
        await writer.drain()
        return
    # With the descriptor (SCM_RIGHTS): a few bytes on an idle socket, sent at once, through
    # a socket object of our own (the transport's wrapper has no sendmsg).
    with socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno())) as own:
        socket.send_fds(own, [data], [fd])


def _connect_in(namespace: int, port: int) -> socket.socket:
    """A TCP connection to 127.0.0.1:`port` made inside the network namespace `namespace` (a
    descriptor of it), from a thread of its own (a namespace is a thread's: the agent's other
    threads stay where they are, and this one ends with the connection made)."""
    result: list[socket.socket | BaseException] = []

    def enter_and_connect() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(namespace, _CLONE_NEWNET) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"setns: {os.strerror(errno)}")
            result.append(socket.create_connection(("127.0.0.1", port), _CONNECT_TIMEOUT_S))
        except BaseException as exc:  # noqa: BLE001 - carried to the caller's thread
            result.append(exc)

    thread = threading.Thread(target=enter_and_connect, name="kiln-container-connect")
    thread.start()
    thread.join()
    outcome = result[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _set_size(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


async def _docker(*args: str, within_s: float | None = 60.0) -> str:
    """Run a docker command; its error ("" if it succeeded)."""
    process = await asyncio.create_subprocess_exec(
        "docker", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(), within_s)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    return "" if process.returncode == 0 else err.decode(errors="replace").strip()


async def _docker_output(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "docker", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60.0)
    if process.returncode != 0:
        raise RuntimeError(err.decode(errors="replace").strip())
    return out.decode().strip()

"""In a container pod's replica: a command in the pod's container, through its node agent's
gateway (`kiln.invoker.containers`), and a connection to a port in it.

`python -m kiln.pods.container_exec SOCKET ARGV...` is what a container pod's terminal runs on
its own pseudo-terminal: it asks the gateway to run ARGV in the container on a terminal of the
agent's, receives that terminal's master end, and carries bytes between the two terminals as
`ssh` does (its own in raw mode, so Ctrl-C travels as a byte), the window's size with them
(SIGWINCH), until the command ends; it exits with the command's status.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import json
import os
import selectors
import signal
import socket
import struct
import sys
import termios
import tty
from collections.abc import Iterator
from pathlib import Path

__all__ = ["connect_in_container", "main", "short_path", "wait_for_container"]

_READ_BYTES = 64 * 1024
_ANSWER_BYTES = 4096


async def connect_in_container(gateway: Path, port: int) -> socket.socket:
    """A TCP connection to 127.0.0.1:`port` in the pod's container (OSError if nothing
    listens there, or the container does not run)."""
    return await asyncio.to_thread(_connect, gateway, port)


async def wait_for_container(gateway: Path, *, within_s: float) -> None:
    """Until the pod's container runs; RuntimeError with why if it never does (its image
    could not be pulled, say)."""
    answer = await asyncio.wait_for(asyncio.to_thread(_ask, gateway, {"op": "ready"}), within_s)
    if "error" in answer:
        raise RuntimeError(str(answer["error"]))


def _ask(gateway: Path, request: dict[str, object]) -> dict[str, object]:
    with _open(gateway) as unix:
        unix.sendall(json.dumps(request).encode() + b"\n")
        answer, fds = _receive(unix)
    for fd in fds:
        os.close(fd)
    return answer


def _connect(gateway: Path, port: int) -> socket.socket:
    with _open(gateway) as unix:
        unix.sendall(json.dumps({"op": "connect", "port": port}).encode() + b"\n")
        answer, fds = _receive(unix)
    if "error" in answer:
        for fd in fds:
            os.close(fd)
        raise ConnectionRefusedError(errno.ECONNREFUSED, str(answer["error"]))
    (fd,) = fds
    return socket.socket(fileno=fd)


@contextlib.contextmanager
def short_path(path: Path) -> Iterator[str]:
    """`path` as a Unix socket may be named (108 bytes at most): through a descriptor of its
    directory, `/proc/self/fd/N/NAME`, however deep the directory is."""
    directory = os.open(path.parent, os.O_PATH | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{directory}/{path.name}"
    finally:
        os.close(directory)


def _open(gateway: Path) -> socket.socket:
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with short_path(gateway) as name:
            unix.connect(name)
    except BaseException:
        unix.close()
        raise
    return unix


def _receive(unix: socket.socket) -> tuple[dict[str, object], list[int]]:
    """One JSON line and the descriptors sent with it."""
    fds = array.array("i")
    data, ancillary, _, _ = unix.recvmsg(_ANSWER_BYTES, socket.CMSG_LEN(4 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    line = data.split(b"\n", 1)[0]
    return (json.loads(line) if line else {"error": "the gateway closed"}), list(fds)


def _size(fd: int) -> tuple[int, int]:
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return cols or 80, rows or 24


def main(argv: list[str]) -> int:
    gateway, command = argv[0], argv[1:]
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    cols, rows = _size(stdin) if os.isatty(stdin) else (80, 24)
    unix = _open(Path(gateway))
    request = {"op": "exec", "argv": command, "cols": cols, "rows": rows,
               "term": os.environ.get("TERM", "xterm-256color")}  # fmt: skip
    unix.sendall(json.dumps(request).encode() + b"\n")
    answer, fds = _receive(unix)
    if "error" in answer or len(fds) != 1:
        sys.stderr.write(f"kiln: {answer.get('error', 'no terminal in the container')}\n")
        return 1
    master = fds[0]
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    if saved is not None:
        tty.setraw(stdin)

        def resized(*_: object) -> None:
            cols, rows = _size(stdin)
            with contextlib.suppress(OSError):
                fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

        signal.signal(signal.SIGWINCH, resized)
    try:
        _relay(stdin, stdout, master)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
    os.close(master)
    rest = b""
    while b"\n" not in rest and (chunk := unix.recv(_ANSWER_BYTES)):
        rest += chunk
    unix.close()
    with contextlib.suppress(ValueError):
        return int(json.loads(rest.split(b"\n", 1)[0])["exit"])
    return 1


def _relay(stdin: int, stdout: int, master: int) -> None:
    """Keys to the container's terminal, its output to ours, until it closes."""
    with selectors.DefaultSelector() as selector:
        selector.register(stdin, selectors.EVENT_READ)
        selector.register(master, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                try:
                    data = os.read(key.fd, _READ_BYTES)
                except InterruptedError:
                    continue
                except OSError as exc:  # EIO: the container's command ended
                    if exc.errno != errno.EIO:
                        raise
                    data = b""
                if key.fd == master:
                    if not data:
                        return
                    _write_all(stdout, data)
                elif data:
                    _write_all(master, data)
                else:
                    selector.unregister(stdin)  # our side closed: the command may still end


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`kiln shell APP/FN [--cmd C]`: a terminal in a fresh replica of a function.

The shell is a pod of its own (`POST /v1/pods {"shell": "APP/FN"}`): a replica with the
function's code, environment, secrets and GPU, billed per second, gone when the terminal
ends. This side is the terminal's client (the protocol is in kiln.pods.terminal_session): the
local terminal goes raw, keystrokes go as binary frames, the window's size as resize controls
(on SIGWINCH too), output is written as it comes, and the command's exit status becomes ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kiln.errors import KilnError

if TYPE_CHECKING:
    from websockets.sync.client import ClientConnection

__all__ = ["run_terminal", "shell"]

# The status when the session ends without the command's (the connection was lost).
_LOST = 255


def shell(
    target: Annotated[str, typer.Argument(help="The function, as APP/NAME.")],
    cmd: Annotated[
        str | None, typer.Option("--cmd", help="Run this command and exit with its status.")
    ] = None,
) -> None:
    """Open a terminal in a fresh replica of APP/NAME (its code, environment and GPU)."""
    from kiln.client import connect

    with connect() as client:
        pod = client.request("POST", "/v1/pods", json={"shell": target}).json()
        size = shutil.get_terminal_size()
        params = {
            "cols": str(size.columns),
            "rows": str(size.lines),
            "term": os.environ.get("TERM") or "xterm-256color",
        }
        if cmd is not None:
            params["cmd"] = cmd
        try:
            with client.websocket(pod["terminal"], params) as session:
                code = run_terminal(session, interactive=sys.stdin.isatty())
        finally:  # it ends with its terminal anyway; this only spares a failed open its wait
            with contextlib.suppress(KilnError):
                client.request("DELETE", f"/v1/pods/{pod['id']}")
    raise typer.Exit(code)


def run_terminal(session: ClientConnection, *, interactive: bool) -> int:
    """Carry a terminal session until it ends; the command's exit status. `interactive`: this
    process's terminal is a TTY, put in raw mode, whose keys and size are sent."""
    from websockets.exceptions import ConnectionClosed

    code: int | None = None
    with _raw_input(session, enabled=interactive):
        try:
            for message in session:
                if isinstance(message, bytes):
                    sys.stdout.buffer.write(message)
                    sys.stdout.buffer.flush()
                    continue
                control = _control(message)
                if control.get("type") == "exit":
                    code = int(control.get("code", _LOST))
        except ConnectionClosed:
            pass
    if code is None:
        reason = session.close_reason or "the connection was lost"
        print(f"\nkiln shell: the session ended without the command's status ({reason})",
              file=sys.stderr)  # fmt: skip
        return _LOST
    return code


def _control(message: str) -> dict[str, Any]:
    try:
        control = json.loads(message)
    except ValueError:
        return {}
    return control if isinstance(control, dict) else {}


@contextlib.contextmanager
def _raw_input(session: ClientConnection, *, enabled: bool) -> Iterator[None]:
    """While inside: this terminal in raw mode, its keys sent as they are typed, its size
    sent when it changes. Restored on the way out, whatever happens."""
    if not enabled:
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)

    def resized(signum: int, frame: object) -> None:
        size = shutil.get_terminal_size()
        with contextlib.suppress(Exception):
            session.send(json.dumps({"type": "resize", "cols": size.columns,
                                     "rows": size.lines}))  # fmt: skip

    previous = signal.signal(signal.SIGWINCH, resized)
    tty.setraw(fd)
    typing = threading.Thread(target=_send_keys, args=(session, fd), daemon=True)
    typing.start()
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, previous)


def _send_keys(session: ClientConnection, fd: int) -> None:
    """Keystrokes to the session until either side ends (a daemon thread: a blocked read dies
    with the process)."""
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            return
        if not data:
            return
        try:
            session.send(data)
        except Exception:  # noqa: BLE001 - the session ended: nothing more to send
            return

"""A terminal over a session: what `WS /v1/pods/ID/terminal` carries, on the pod's side.

The protocol, for any WebSocket client:

- binary frames from the client are typed into the terminal (Ctrl-C is the byte 0x03);
- a text frame from the client is a JSON control: `{"type": "resize", "cols": C, "rows": R}`;
- binary frames to the client are the terminal's output, as the programs wrote it;
- when the command exits, one text frame `{"type": "exit", "code": N}` (N as a shell gives
  it: 128 plus the signal for a command a signal ended), then a normal close (1000); programs
  it left in the background go on (a pod's server started from its terminal, say).

The session's parameters (the WebSocket URL's query) choose the command and the window:
`cmd` (run with `/bin/sh -c`; without it, an interactive login shell), `cols`, `rows`, `term`.
A client that goes away hangs the terminal up (SIGHUP to its programs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from kiln.errors import InvalidRequest
from kiln.functions.session import Session, SessionClosed
from kiln.pods.terminal import Terminal

__all__ = ["TerminalRequest", "serve_terminal"]

_MAX_COLS = 1000
# After the command exits, how long its last output has to arrive.
_LAST_OUTPUT_S = 0.5
_MAX_ROWS = 500
# A container's login shell: bash where the image has it, else its sh.
_CONTAINER_SHELL = "command -v bash >/dev/null 2>&1 && exec bash -l; exec sh -l"


class TerminalRequest:
    """What a terminal session asked for, checked."""

    def __init__(self, params: Mapping[str, str]) -> None:
        self.cols = _dimension(params, "cols", 80, _MAX_COLS)
        self.rows = _dimension(params, "rows", 24, _MAX_ROWS)
        self.cmd = params.get("cmd") or None
        self.term = params.get("term") or "xterm-256color"

    def argv(self, *, gateway: Path | None = None) -> list[str]:
        """The command; with a container pod's `gateway`, run in its container through it."""
        if gateway is not None:
            inner = ["/bin/sh", "-c", self.cmd if self.cmd is not None else _CONTAINER_SHELL]
            return [sys.executable, "-m", "kiln.pods.container_exec", str(gateway), *inner]
        if self.cmd is not None:
            return ["/bin/sh", "-c", self.cmd]
        shell = shutil.which("bash") or "/bin/sh"
        return [shell, "-l"] if shell.endswith("bash") else [shell]


def _dimension(params: Mapping[str, str], name: str, default: int, most: int) -> int:
    given = params.get(name)
    if given is None or given == "":
        return default
    try:
        value = int(given)
    except ValueError:
        value = 0
    if not 1 <= value <= most:
        raise InvalidRequest(
            f"{name}={given!r} is not a terminal size: give a whole number from 1 to {most}",
            param=name,
        )
    return value


async def serve_terminal(
    session: Session,
    request: TerminalRequest,
    *,
    env: Mapping[str, str],
    cwd: Path,
    gateway: Path | None = None,
) -> int:
    """Run the requested command on a terminal of its own and carry it over `session` until
    the command exits (its status is sent and returned) or the client leaves (the terminal is
    hung up; its status is returned). `gateway`: a container pod's (the command runs in its
    container)."""
    terminal = await Terminal.start(
        request.argv(gateway=gateway),
        env={**env, "TERM": request.term, "COLUMNS": str(request.cols),
             "LINES": str(request.rows)},
        cwd=cwd if os.path.isdir(cwd) else None,  # noqa: ASYNC240 - one stat of a local dir
        cols=request.cols,
        rows=request.rows,
    )  # fmt: skip
    output = asyncio.ensure_future(_output(terminal, session))
    typing = asyncio.ensure_future(_input(terminal, session))
    exited = asyncio.ensure_future(terminal.wait())
    try:
        await asyncio.wait({output, typing, exited}, return_when=asyncio.FIRST_COMPLETED)
        if exited.done() or (output.done() and output.exception() is None):
            # The command ended. A program it left running in the background may hold the
            # terminal open for ever (the terminal never reads as closed): what the command
            # wrote is sent if it comes within the grace, and the session ends with the
            # command, as `docker exec` does, not with its last holder.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(output), _LAST_OUTPUT_S)
            code = await exited
            typing.cancel()
            with contextlib.suppress(SessionClosed):
                await session.send(json.dumps({"type": "exit", "code": code}))
            return code
        return await terminal.close()
    finally:
        for task in (output, typing, exited):
            task.cancel()
        await asyncio.gather(output, typing, exited, return_exceptions=True)
        await terminal.close()


async def _output(terminal: Terminal, session: Session) -> None:
    while data := await terminal.read():
        await session.send(data)


async def _input(terminal: Terminal, session: Session) -> None:
    """The client's keystrokes and controls, until it closes the session."""
    while True:
        try:
            message = await session.receive()
        except SessionClosed:
            return
        if isinstance(message, bytes):
            try:
                terminal.write(message)
            except BufferError:
                continue  # the program reads no input: what the client typed is dropped
            continue
        try:
            control = json.loads(message)
            if control.get("type") == "resize":
                terminal.resize(
                    min(max(int(control["cols"]), 1), _MAX_COLS),
                    min(max(int(control["rows"]), 1), _MAX_ROWS),
                )
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            continue  # an unreadable control changes nothing


def login_env(base: Mapping[str, str], home: str | None = None) -> dict[str, str]:
    """The terminal's environment: the replica's own (its function's variables and secrets),
    with a home and a shell prompt."""
    env = dict(base)
    if home is not None:
        env["HOME"] = home
    env.setdefault("SHELL", shutil.which("bash") or "/bin/sh")
    env.setdefault("USER", str(os.getuid()))
    return env

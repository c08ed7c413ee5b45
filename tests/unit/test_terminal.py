"""The terminal a shell or a pod runs (issue 28): a real PTY that programs take for a TTY, its
size and resizes, Ctrl-C as a byte, exit statuses as a shell gives them, and a hang-up that
ends a command that would not."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest
from eventually import eventually

from kiln.pods.terminal import Terminal

pytestmark = pytest.mark.skipif(shutil.which("setsid") is None, reason="needs util-linux's setsid")
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "xterm-256color"}


async def output_until(terminal: Terminal, text: bytes, within_s: float = 10) -> bytes:
    seen = b""

    async def more() -> bool:
        nonlocal seen
        seen += await asyncio.wait_for(terminal.read(), within_s)
        return text in seen

    await eventually(more, within_s=within_s)
    return seen


async def test_programs_see_a_terminal_of_the_size_asked_and_its_resizes() -> None:
    terminal = await Terminal.start(
        ["bash", "--norc", "-c", "test -t 0 && echo is-a-tty; stty size; read; stty size"],
        env=ENV, cols=100, rows=30,
    )  # fmt: skip
    try:
        seen = await output_until(terminal, b"30 100")
        assert b"is-a-tty" in seen
        terminal.resize(120, 40)
        terminal.write(b"\n")
        await output_until(terminal, b"40 120")
        assert await terminal.wait() == 0
    finally:
        await terminal.close()


async def test_ctrl_c_interrupts_what_runs_in_the_foreground() -> None:
    terminal = await Terminal.start(
        ["bash", "--norc", "-c", "trap 'echo interrupted; exit 7' INT; echo ready; "
         "while true; do sleep 0.1; done"],
        env=ENV,
    )  # fmt: skip
    try:
        await output_until(terminal, b"ready")
        terminal.write(b"\x03")  # what a keyboard's Ctrl-C sends
        await output_until(terminal, b"interrupted")
        assert await asyncio.wait_for(terminal.wait(), 10) == 7
    finally:
        await terminal.close()


@pytest.mark.parametrize(("command", "status"), [("exit 3", 3), ("kill -TERM $$", 128 + 15)])
async def test_the_exit_status_is_a_shells(command: str, status: int) -> None:
    terminal = await Terminal.start(["bash", "--norc", "-c", command], env=ENV)
    try:
        assert await asyncio.wait_for(terminal.wait(), 10) == status
        assert await asyncio.wait_for(_drain(terminal), 10) is True  # then the end of output
    finally:
        await terminal.close()


async def _drain(terminal: Terminal) -> bool:
    while await terminal.read():
        pass
    return True


async def test_closing_hangs_up_and_kills_what_ignores_it() -> None:
    terminal = await Terminal.start(
        ["bash", "--norc", "-c", "trap '' HUP; echo started; sleep 600"], env=ENV
    )
    await output_until(terminal, b"started")
    status = await asyncio.wait_for(terminal.close(grace_s=0.5), 10)
    assert status == 128 + 9  # it ignored the hang-up: killed
    with pytest.raises(ProcessLookupError):
        os.kill(terminal.process.pid, 0)

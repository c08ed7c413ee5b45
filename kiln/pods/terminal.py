"""A command on a pseudo-terminal of its own: what a shell or a pod's terminal runs.

The command is the session leader of a new session whose controlling terminal is the PTY, so
the terminal behaves as a local one: programs see a TTY (colours, line editing), Ctrl-C written
as a byte interrupts the foreground process group through the line discipline, a resize sends
SIGWINCH. Output is read from the PTY's master end without blocking the event loop, in the
order written, until every holder of the terminal has closed it; the exit status is a shell's
(128 plus the signal for a process a signal ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import pty
import shutil
import signal
import struct
import sys
import termios
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["Terminal"]

_READ_BYTES = 64 * 1024
_QUEUED = 256  # reads waiting for the reader; past this the PTY is not read until it catches up


def _set_size(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _setsid() -> str:
    """util-linux's `setsid`: it makes the command a session leader with the PTY (its standard
    input) as the controlling terminal, then execs it (same pid). A preexec function could do the
    same but is not safe to run in a process with threads, as a replica has."""
    found = shutil.which("setsid")
    if found is None:
        raise RuntimeError("setsid (util-linux) is missing: install util-linux")
    return found


# Run between `setsid` and the command: signals the parent ignores (a replica ignores SIGINT,
# and an ignored signal stays ignored across exec) are the defaults again, so Ctrl-C reaches
# the command; then the command replaces it.
_DEFAULT_SIGNALS = """
import os, signal, sys
for name in ("SIGINT", "SIGQUIT", "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGHUP", "SIGPIPE",
             "SIGTERM", "SIGCHLD"):
    signal.signal(getattr(signal, name), signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_SETMASK, [])
os.execvp(sys.argv[1], sys.argv[1:])
"""


class Terminal:
    def __init__(self, process: asyncio.subprocess.Process, master: int) -> None:
        self.process = process
        self.master = master
        self._output: asyncio.Queue[bytes] = asyncio.Queue(_QUEUED)
        self._loop = asyncio.get_running_loop()
        self._reading = False
        self._closed = False
        self._listen()

    @classmethod
    async def start(
        cls,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path | None = None,
        cols: int = 80,
        rows: int = 24,
    ) -> Terminal:
        """Run `argv` on a new terminal of `cols` x `rows`."""
        master, slave = pty.openpty()
        try:
            _set_size(slave, cols, rows)
            os.set_blocking(master, False)
            process = await asyncio.create_subprocess_exec(
                _setsid(), "--ctty", "--", sys.executable, "-I", "-S", "-c", _DEFAULT_SIGNALS,
                *argv, stdin=slave, stdout=slave, stderr=slave,
                env=dict(env), cwd=cwd,
            )  # fmt: skip
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)  # the child holds it now: EOF comes when the last holder closes
        return cls(process, master)

    def _listen(self) -> None:
        if not self._reading and not self._closed:
            self._loop.add_reader(self.master, self._readable)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.master)
            self._reading = False

    def _readable(self) -> None:
        try:
            data = os.read(self.master, _READ_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:  # EIO: every holder of the terminal closed it
            if exc.errno != errno.EIO:
                raise
            data = b""
        if not data:
            self._pause()
        self._output.put_nowait(data)
        if self._output.full():  # a slow reader: stop reading until it catches up
            self._pause()

    async def read(self) -> bytes:
        """The next output, as it came; b"" once the terminal has no holder left."""
        data = await self._output.get()
        if data == b"":
            self._output.put_nowait(b"")  # every later read sees the end too
        elif not self._output.full():
            self._listen()
        return data

    def write(self, data: bytes) -> None:
        """Type `data` (Ctrl-C is b"\\x03")."""
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.master, view)
            except BlockingIOError:  # the line discipline is full: the program is not reading
                written = 0
            if written == 0:
                raise BufferError("the terminal is not taking input")
            view = view[written:]

    def resize(self, cols: int, rows: int) -> None:
        """The window is now `cols` x `rows` (the program gets SIGWINCH)."""
        _set_size(self.master, cols, rows)

    async def wait(self) -> int:
        """The exit status: the command's code, or 128 plus the signal that ended it."""
        code = await self.process.wait()
        return 128 - code if code < 0 else code

    async def close(self, grace_s: float = 2.0) -> int:
        """End the session: SIGHUP to its process group (a terminal hung up), SIGKILL after
        `grace_s`; its exit status. Once the command has exited, only the terminal is closed:
        what it left running in the background is left alone."""
        if self.process.returncode is None:
            self._signal_group(signal.SIGHUP)
            try:
                await asyncio.wait_for(self.process.wait(), grace_s)
            except TimeoutError:
                self._signal_group(signal.SIGKILL)
                await self.process.wait()
        self._pause()
        if not self._closed:
            self._closed = True
            os.close(self.master)
        return await self.wait()

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)  # the session leader's group: every job in it

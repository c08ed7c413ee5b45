"""A replica's function output: what the user's code prints (stdout, stderr) and logs, line by
line, each tagged with the replica and the call (and request id) it belongs to, shipped to the
function's log subject (`ns.logs.<fid>`, kept by the `<ns>_logs` JetStream stream) for
`kiln logs`.

Printing never waits for NATS: any thread appends the line to a bounded queue, and one task on
the replica's event loop sends the queue in messages of up to 64 KB (newline-separated JSON
records) every 100 ms. When the queue is full, lines are dropped and counted, and the count is
shipped as a line of its own. What is printed still reaches the process's own stdout and
stderr (the node's logs), where kiln's log lines carry the request id too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import io
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TextIO

from nats.aio.client import Client as NATS

from kiln.seal import FunctionSealer

__all__ = ["CURRENT_CALL", "CallContextFilter", "FunctionOutput", "in_call"]

# The call the running code serves: (call id, request id). Calls run in tasks of their own and
# their sync code in threads that get a copy of the task's context, so prints and log records
# find the call they belong to.
CURRENT_CALL: ContextVar[tuple[str, str] | None] = ContextVar("kiln_current_call", default=None)

MAX_LINE_CHARS = 16 * 1024
_MAX_MESSAGE_BYTES = 64 * 1024
_MAX_QUEUED = 10_000
_SEND_EVERY_S = 0.1


# Threads the user's code starts itself do not inherit the context; while exactly one call
# runs (the default concurrency), their lines are that call's.
_running: list[tuple[str, str]] = []
_sole: tuple[str, str] | None = None


@contextlib.contextmanager
def in_call(call_id: str, request_id: str) -> Iterator[None]:
    global _sole
    call = (call_id, request_id)
    token = CURRENT_CALL.set(call)
    _running.append(call)
    _sole = call if len(_running) == 1 else None
    try:
        yield
    finally:
        CURRENT_CALL.reset(token)
        _running.remove(call)
        _sole = _running[0] if len(_running) == 1 else None


def current_call() -> tuple[str, str] | None:
    """The call the running code serves, as far as can be told."""
    return CURRENT_CALL.get() or _sole


class CallContextFilter(logging.Filter):
    """Gives every record `request_id` (the current call's, or "-") for the log format."""

    def filter(self, record: logging.LogRecord) -> bool:
        call = current_call()
        record.request_id = call[1] if call is not None else "-"
        return True


class FunctionOutput:
    def __init__(self, nc: NATS, subject: str, replica_id: str, *, sealer: FunctionSealer) -> None:
        self.nc = nc
        self.subject = subject
        self.replica_id = replica_id
        self.sealer = sealer
        self._lines: collections.deque[bytes] = collections.deque()
        self._dropped = 0
        self._restore: list[Callable[[], None]] = []

    def line(self, stream: str, text: str, level: str | None = None) -> None:
        """Queue one line (from any thread; never blocks)."""
        if len(self._lines) >= _MAX_QUEUED:
            self._dropped += 1
            return
        self._lines.append(self._record(stream, text, level))

    def _record(self, stream: str, text: str, level: str | None) -> bytes:
        record: dict[str, object] = {
            "t": round(time.time(), 6),
            "replica": self.replica_id,
            "stream": stream,
            "line": text[:MAX_LINE_CHARS],
        }
        call = current_call()
        if call is not None:
            record["call"], record["request_id"] = call
        if level is not None:
            record["level"] = level
        return json.dumps(record, ensure_ascii=False).encode()

    @property
    def queued(self) -> int:
        return len(self._lines)

    def install(self) -> None:
        """Capture this process's stdout, stderr and logging from now on."""
        for name in ("stdout", "stderr"):
            original: TextIO = getattr(sys, name)
            setattr(sys, name, _Lines(original, name, self))
            self._restore.append(functools.partial(setattr, sys, name, original))
        handler = _LogLines(self)
        root = logging.getLogger()
        root.addHandler(handler)
        self._restore.append(lambda: root.removeHandler(handler))

    def uninstall(self) -> None:
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()

    async def run(self) -> None:
        """Send what is queued, every 100 ms, until cancelled."""
        while True:
            await asyncio.sleep(_SEND_EVERY_S)
            with contextlib.suppress(Exception):  # NATS trouble: the lines wait for the next turn
                await self.send()

    async def send(self) -> None:
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            notice = f"[kiln] {dropped} lines were dropped: output came too fast"
            self._lines.append(self._record("kiln", notice, None))  # past the bound: it is one
        while self._lines:
            batch: list[bytes] = []
            size = 0
            while self._lines and size + len(self._lines[0]) < _MAX_MESSAGE_BYTES:
                line = self._lines.popleft()
                batch.append(line)
                size += len(line) + 1
            if not batch:  # a record over the limit on its own (a long line of multi-byte text)
                batch.append(self._lines.popleft()[: _MAX_MESSAGE_BYTES - 1])
            body = b"\n".join(batch)
            await self.nc.publish(
                self.subject, body, headers=self.sealer.headers(self.subject, body)
            )


class _Lines(io.TextIOBase):
    """A stand-in for sys.stdout or sys.stderr: writes through to the original and queues each
    complete line. A line in the making is kept per thread, so threads printing at once do
    not mix their halves."""

    def __init__(self, original: TextIO, stream: str, output: FunctionOutput) -> None:
        super().__init__()
        self._original = original
        self._stream = stream
        self._output = output
        self._partial = threading.local()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._original.write(text)
        buffered = getattr(self._partial, "text", "") + text
        *lines, rest = buffered.split("\n")
        for line in lines:
            self._output.line(self._stream, line)
        if len(rest) > MAX_LINE_CHARS:
            self._output.line(self._stream, rest)
            rest = ""
        self._partial.text = rest
        return len(text)

    def flush(self) -> None:
        self._original.flush()

    def fileno(self) -> int:
        return self._original.fileno()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._original.encoding


class _LogLines(logging.Handler):
    def __init__(self, output: FunctionOutput) -> None:
        super().__init__(logging.INFO)
        self.output = output
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.output.line("log", self.format(record), record.levelname)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)

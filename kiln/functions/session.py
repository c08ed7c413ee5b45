"""`kiln.Session`: what a `@kiln.websocket()` handler talks through.

The handler runs in a replica for as long as the client's WebSocket stays open; the platform
carries frames both ways over NATS, in order and paced by credits, so a handler that does not
read holds the client back instead of letting frames pile up.

    @kiln.websocket()
    async def echo(self, session: kiln.Session) -> None:
        async for message in session:      # str for text frames, bytes for binary ones
            await session.send(message)

Standard library only: the SDK imports this module.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping

__all__ = ["Session", "SessionClosed"]


class SessionClosed(Exception):
    """The client closed the WebSocket (or the session ended): nothing more to receive."""

    def __init__(self, code: int = 1000, reason: str = "") -> None:
        super().__init__(f"the session was closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class Session(abc.ABC):
    """One WebSocket session, pinned to this replica for its life."""

    @property
    @abc.abstractmethod
    def params(self) -> Mapping[str, str]:
        """The query parameters the client opened the WebSocket with."""

    @abc.abstractmethod
    async def receive(self) -> str | bytes:
        """The next message: `str` for a text frame, `bytes` for a binary one. Raises
        `SessionClosed` once the client has closed the WebSocket."""

    @abc.abstractmethod
    async def send(self, message: str | bytes) -> None:
        """Send a text (`str`) or binary (`bytes`) frame; waits while the client is behind."""

    @abc.abstractmethod
    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the WebSocket with `code` (1000: normal, or 3000-4999 for your own) and a
        reason of at most 123 bytes."""

    async def receive_text(self) -> str:
        message = await self.receive()
        if not isinstance(message, str):
            raise TypeError(f"expected a text frame, got {len(message)} bytes of binary")
        return message

    async def receive_bytes(self) -> bytes:
        message = await self.receive()
        if not isinstance(message, bytes):
            raise TypeError(f"expected a binary frame, got text {message[:40]!r}")
        return message

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[str | bytes]:
        while True:
            try:
                yield await self.receive()
            except SessionClosed:
                return

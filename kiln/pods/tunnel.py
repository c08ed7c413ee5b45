"""A TCP connection to a port in the pod, carried over a session: what a forwarded port
(`/v1/pods/ID/ports/PORT/`, `kiln pods forward`) rides on, on the pod's side.

Binary frames both ways are the connection's bytes, in order; the session's credits hold a
slow side back. The connection goes to 127.0.0.1:PORT inside the pod's sandbox. When the
program closes it, the session ends (1000); when the client ends the session, the connection
is closed. Nothing listening on the port ends the session at once with 1011 and a reason
that says so.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from kiln.functions.session import Session, SessionClosed
from kiln.pods.container_exec import connect_in_container

__all__ = ["serve_tunnel"]

_READ_BYTES = 64 * 1024


async def serve_tunnel(session: Session, port: int, *, gateway: Path | None = None) -> None:
    """`gateway`: a container pod's, through which the port is reached in its container."""
    try:
        if gateway is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        else:
            sock = await connect_in_container(gateway, port)
            reader, writer = await asyncio.open_connection(sock=sock)
    except OSError:
        await session.close(1011, f"nothing listens on port {port} in the pod")
        return
    upstream = asyncio.ensure_future(_from_port(reader, session))
    downstream = asyncio.ensure_future(_to_port(session, writer))
    try:
        await asyncio.wait({upstream, downstream}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (upstream, downstream):
            task.cancel()
        await asyncio.gather(upstream, downstream, return_exceptions=True)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _from_port(reader: asyncio.StreamReader, session: Session) -> None:
    while data := await reader.read(_READ_BYTES):
        await session.send(data)


async def _to_port(session: Session, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            message = await session.receive()
        except SessionClosed:
            return
        writer.write(message if isinstance(message, bytes) else message.encode())
        await writer.drain()

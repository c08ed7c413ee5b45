"""Does a server answer like NATS (with JetStream), PostgreSQL or Redis? Standard library only,
one short round trip each, so the test suite and `kiln dev` can decide quickly whether to use a
running server or start an embedded one."""

from __future__ import annotations

import json
import socket
import struct
from urllib.parse import urlsplit

__all__ = ["nats_answers", "postgres_answers", "redis_answers"]

_SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def _address(url: str, default_port: int) -> tuple[str, int]:
    split = urlsplit(url.split(",")[0])
    return split.hostname or "127.0.0.1", split.port or default_port


def nats_answers(url: str, timeout_s: float = 0.5, *, have_credentials: bool = False) -> bool:
    """True if a NATS server with JetStream enabled greets us at `url`, and does not demand
    credentials that we lack (neither in the URL nor, `have_credentials`, in a file)."""
    try:
        with socket.create_connection(_address(url, 4222), timeout=timeout_s) as sock:
            greeting = sock.makefile("rb").readline(64 * 1024)
    except OSError:
        return False
    if not greeting.startswith(b"INFO "):
        return False
    try:
        info = json.loads(greeting[5:])
    except ValueError:
        return False
    if info.get("auth_required") and not (have_credentials or urlsplit(url.split(",")[0]).username):
        return False
    return bool(info.get("jetstream"))


def postgres_answers(url: str, timeout_s: float = 0.5) -> bool:
    """True if a PostgreSQL server answers the protocol's SSL negotiation at `url`."""
    try:
        with socket.create_connection(_address(url, 5432), timeout=timeout_s) as sock:
            sock.sendall(_SSL_REQUEST)
            return sock.recv(1) in (b"S", b"N")
    except OSError:
        return False


def redis_answers(url: str, timeout_s: float = 0.5) -> bool:
    """True if a Redis server answers PING at `url` (after AUTH when the URL has a password)."""
    split = urlsplit(url)
    try:
        with socket.create_connection(_address(url, 6379), timeout=timeout_s) as sock:
            reader = sock.makefile("rb")
            if split.password:
                auth = [b"AUTH", *([split.username.encode()] if split.username else []),
                        split.password.encode()]  # fmt: skip
                sock.sendall(_resp(auth))
                if not reader.readline().startswith(b"+OK"):
                    return False
            sock.sendall(_resp([b"PING"]))
            return reader.readline().startswith(b"+PONG")
    except OSError:
        return False


def _resp(parts: list[bytes]) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)

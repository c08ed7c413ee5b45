"""Choosing loopback ports for the embedded services."""

from __future__ import annotations

import socket

__all__ = ["is_free", "pick_port"]


def is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing listens on (host, port), so a server can bind it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the servers themselves, ignore connections of a previous run still in TIME_WAIT;
        # only a live listener makes the bind fail.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(preferred: list[int | None], taken: set[int], host: str = "127.0.0.1") -> int:
    """The first free port of `preferred` (the last run's, then the well-known default), else
    one the kernel hands out. `taken` holds ports already promised to other services."""
    for port in preferred:
        if port and port not in taken and is_free(port, host):
            return port
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            return port

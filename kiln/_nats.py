"""How a platform process connects to NATS: the one place that turns `Settings` into the
keywords of `nats.connect(...)`, credentials included, so no process (or test) connects its
own way and forgets them."""

from __future__ import annotations

from typing import Any

from kiln.settings import Settings

__all__ = ["connect_options"]


def connect_options(settings: Settings, *, name: str | None = None) -> dict[str, Any]:
    """Keywords for `nats.connect(**connect_options(settings))`: the servers, the connect
    timeout and, when `KILN_NATS_CREDS` is set, the process's credentials."""
    options: dict[str, Any] = {
        "servers": settings.nats_servers,
        "connect_timeout": settings.connect_timeout_s,
    }
    if name is not None:
        options["name"] = name
    if settings.nats_creds is not None:
        options["user_credentials"] = str(settings.nats_creds)
    return options

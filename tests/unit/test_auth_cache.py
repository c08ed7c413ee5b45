"""The router's key verdicts without services: a malformed key is refused before any lookup,
and a router that cannot hear revocations trusts its cache for one second instead of five."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from starlette.requests import HTTPConnection

from kiln.apikeys import mint_key
from kiln.db.enums import ApiKeyKind
from kiln.errors import Unauthenticated
from kiln.router.auth import Authenticator, Principal


def connection(key: str) -> HTTPConnection:
    scope = {"type": "http", "headers": [(b"authorization", f"Bearer {key}".encode())]}
    return HTTPConnection(scope)


class _Link:
    def __init__(self, connected: bool) -> None:
        self.is_connected = connected


def principal() -> Principal:
    return Principal(uuid.uuid4(), ApiKeyKind.ACCOUNT, uuid.uuid4(), None)


async def test_a_malformed_key_is_refused_without_any_lookup() -> None:
    rejected: list[str] = []
    # No database, no Redis: any lookup would fail loudly.
    auth = Authenticator(None, "pepper", on_reject=rejected.append)  # type: ignore[arg-type]
    key = mint_key(ApiKeyKind.ACCOUNT).plaintext
    for bad in (key[:-1] + ("x" if key[-1] != "x" else "y"), key[:20], "kiln_acct_x_y"):
        with pytest.raises(Unauthenticated, match=r"^malformed API key"):
            await auth.authenticate(connection(bad))
    assert rejected == ["malformed"] * 3


@pytest.mark.parametrize(("connected", "reused"), [(True, True), (False, False)])
async def test_a_router_without_nats_keeps_verdicts_a_second_only(
    connected: bool, reused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = Authenticator(None, "pepper")  # type: ignore[arg-type]
    auth.nc = _Link(connected)  # type: ignore[assignment]
    key = mint_key(ApiKeyKind.ACCOUNT).plaintext
    cached, fresh = principal(), principal()
    auth._cache[key] = (time.monotonic() - 2.0, cached)  # two seconds old

    async def lookup(digest: bytes) -> Any:
        return fresh

    monkeypatch.setattr(auth, "_verdict", lookup)
    got = await auth.authenticate(connection(key))
    assert got is (cached if reused else fresh)


async def test_reconnecting_forgets_every_verdict() -> None:
    auth = Authenticator(None, "pepper")  # type: ignore[arg-type]
    auth._cache["k"] = (time.monotonic(), principal())
    auth.on_reconnected()
    assert auth._cache == {}

"""Seals: MACs that say who wrote a NATS message, for the messages the platform acts on.

NATS checks what a client publishes, not what the server publishes for it: a replica's pull
request names a reply subject, and the server delivers the next call there; a direct get of its
own bucket, or a consumer it creates there, does the same with objects it wrote. So a replica can
put bytes of its choosing (headers included) on any subject of the account (docs/security.md).
Permissions alone cannot tell a node command from a forged one; a seal can:

- **platform seals** (`Seals.platform`) are made with a key derived from the platform's signing
  key (`KILN_SNAPSHOT_SIGNING_KEY`), which replicas never hold: node commands and heartbeats,
  replica exits, demand, router announcements, billing blocks, key revocations;
- **function seals** (`Seals.function`) are made with a key of the function's own, derived from
  the same secret, that the node agent hands each replica of that function: its heartbeats,
  cold-start reports, snapshot requests, logs and job events. A replica can seal only in its own
  function's name. Routers seal calls with it too, so a replica takes a call only if a router
  addressed it to its function.

A seal covers the subject and the body (`Kiln-Seal: <hex>`); a call's covers the subject and its
call header (`Kiln-Call`: its id, router, token...), not its body, which may be megabytes: a
forger would need a call to that function to copy, and replicas see only their own function's.
A seal binds a message to a function, not to one replica: whoever checks a replica's message
also checks that the replica belongs to the function it names, where it knows.

Without a signing key (a test that builds parts by hand) nothing is sealed and everything is
taken, as before seals existed. Standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from typing import Protocol

__all__ = ["SEAL", "FunctionSealer", "Seals", "function_key"]

SEAL = "Kiln-Seal"
_CACHED_KEYS = 4096
_WARN_EVERY_S = 60.0
_log = logging.getLogger("kiln.seal")


class Message(Protocol):
    """What a received NATS message offers (nats.aio.msg.Msg)."""

    subject: str
    data: bytes
    headers: dict[str, str] | None


def _mac(key: bytes, subject: str, body: bytes) -> str:
    mac = hmac.new(key, subject.encode(), hashlib.sha256)
    mac.update(b"\n")
    mac.update(body)
    return mac.hexdigest()


def _same(seal: str, expected: str) -> bool:
    # As bytes: compare_digest refuses a str that is not ASCII, and a header is anyone's text.
    return hmac.compare_digest(seal.encode("utf-8", "replace"), expected.encode())


def function_key(secret: str, function_id: uuid.UUID) -> bytes:
    """The key that a function's replicas seal with, and that routers seal its calls with."""
    message = b"kiln function " + function_id.hex.encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).digest()


class FunctionSealer:
    """What a replica seals with: its function's key, handed over in its launch file."""

    def __init__(self, key: bytes | None) -> None:
        self.key = key

    def headers(self, subject: str, body: bytes) -> dict[str, str] | None:
        if self.key is None:
            return None
        return {SEAL: _mac(self.key, subject, body)}

    def opens(self, subject: str, body: bytes, headers: Mapping[str, str] | None) -> bool:
        """Whether a router sealed this for the function (a call another replica's pull request
        had delivered here, or one copied out of a bucket, has no seal of this function)."""
        if self.key is None:
            return True
        seal = (headers or {}).get(SEAL, "")
        return _same(seal, _mac(self.key, subject, body))


class Seals:
    """The platform's side: seals its own messages, checks its own and its replicas'."""

    def __init__(self, secret: str | None) -> None:
        self.secret = secret
        self._platform = (
            hmac.new(secret.encode(), b"kiln platform messages", hashlib.sha256).digest()
            if secret is not None
            else b""
        )
        self._functions: OrderedDict[uuid.UUID, bytes] = OrderedDict()
        self._warned: dict[str, float] = {}  # what was refused -> when it was last logged

    @property
    def enabled(self) -> bool:
        return self.secret is not None

    def function_key(self, function_id: uuid.UUID) -> bytes | None:
        """None without a signing key."""
        if self.secret is None:
            return None
        key = self._functions.get(function_id)
        if key is None:
            key = self._functions[function_id] = function_key(self.secret, function_id)
            while len(self._functions) > _CACHED_KEYS:
                self._functions.popitem(last=False)
        return key

    # Platform messages -------------------------------------------------------------------------

    def platform(self, subject: str, body: bytes) -> dict[str, str] | None:
        """Headers that seal a platform message (None without a signing key)."""
        if self.secret is None:
            return None
        return {SEAL: _mac(self._platform, subject, body)}

    def from_platform(self, subject: str, body: bytes, headers: Mapping[str, str] | None) -> bool:
        if self.secret is None:
            return True
        seal = (headers or {}).get(SEAL, "")
        return _same(seal, _mac(self._platform, subject, body))

    # Function messages -------------------------------------------------------------------------

    def function(self, function_id: uuid.UUID, subject: str, body: bytes) -> dict[str, str] | None:
        key = self.function_key(function_id)
        return None if key is None else {SEAL: _mac(key, subject, body)}

    def from_function(
        self, function_id: uuid.UUID, subject: str, body: bytes, headers: Mapping[str, str] | None
    ) -> bool:
        """Whether a replica of `function_id` wrote this message."""
        key = self.function_key(function_id)
        if key is None:
            return True
        seal = (headers or {}).get(SEAL, "")
        return _same(seal, _mac(key, subject, body))

    # Receiving ---------------------------------------------------------------------------------

    def platform_sent(self, msg: Message, what: str) -> bool:
        """Whether the platform sent `msg`; a refusal is logged as `what` ("a node command")."""
        if self.secret is None:
            return True
        return self._taken(self.from_platform(msg.subject, msg.data, msg.headers), what, msg)

    def function_sent(self, msg: Message, function_id: uuid.UUID, what: str) -> bool:
        """Whether a replica of `function_id` sent `msg`; a refusal is logged as `what`."""
        if self.secret is None:
            return True
        sealed = self.from_function(function_id, msg.subject, msg.data, msg.headers)
        return self._taken(sealed, what, msg)

    def _taken(self, sealed: bool, what: str, msg: Message) -> bool:
        if not sealed:
            now = time.monotonic()
            if now - self._warned.get(what, -_WARN_EVERY_S) >= _WARN_EVERY_S:
                self._warned[what] = now
                _log.warning(
                    "ignoring %s on %s without its seal: a replica may be forging messages "
                    "(logged once a minute)", what, msg.subject,
                )  # fmt: skip
        return sealed

"""Console passwords: argon2id hashes (argon2-cffi's defaults, RFC 9106's second recommended
set: 64 MiB, 3 passes, 4 lanes), computed in a worker thread because one hash takes ~80 ms of
CPU that the event loop must not spend.

A sign-in for an address that has no user still verifies a password, against a hash made once
per process, so the answer's timing does not tell which addresses have accounts.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = ["MAX_CHARS", "MIN_CHARS", "Checked", "check", "hash_password", "problem"]

MIN_CHARS = 10
MAX_CHARS = 256  # far beyond any passphrase; bounds the work a request can ask for

_HASHER = PasswordHasher()


def problem(password: str) -> str | None:
    """What is wrong with `password` as a new password, in words for the form; None if fine."""
    if len(password) < MIN_CHARS:
        return f"use at least {MIN_CHARS} characters (this one has {len(password)})"
    if len(password) > MAX_CHARS:
        return f"use at most {MAX_CHARS} characters"
    if not password.strip():
        return "use something other than spaces"
    return None


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_HASHER.hash, password)


@dataclass(frozen=True)
class Checked:
    ok: bool
    # A hash of the same password with today's parameters, when the stored one is older.
    rehashed: str | None = None


async def check(stored: str | None, password: str) -> Checked:
    """Whether `password` matches `stored` (None: there is no user; the work is done anyway)."""
    return await asyncio.to_thread(_check, stored, password)


def _check(stored: str | None, password: str) -> Checked:
    try:
        _HASHER.verify(stored or _decoy(), password)
    except (VerificationError, InvalidHashError):
        return Checked(ok=False)
    if stored is None:
        return Checked(ok=False)
    rehashed = _HASHER.hash(password) if _HASHER.check_needs_rehash(stored) else None
    return Checked(ok=True, rehashed=rehashed)


@functools.cache
def _decoy() -> str:
    return _HASHER.hash("a password nobody has")

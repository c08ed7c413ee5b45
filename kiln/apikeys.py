"""API key format, minting and hashing (standard library only, so the CLI can use it).

A key reads `kiln_<kind>_<secret>_<checksum>`:

- kind: `op` (operator), `acct` (account) or `fn` (one function);
- secret: 32 base62 characters from `secrets` (about 190 bits);
- checksum: CRC32 of everything before it, 6 base62 characters, so a mistyped or truncated key
  is refused before any Redis or PostgreSQL lookup.

Only HMAC-SHA256(pepper, key) and a short display prefix are ever stored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import zlib
from dataclasses import dataclass

from kiln.db.enums import ApiKeyKind

__all__ = ["MintedKey", "display_prefix", "hash_key", "mint_key", "parse_key"]

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SECRET_CHARS = 32
_CHECKSUM_CHARS = 6
_PREFIX_SECRET_CHARS = 8


TOKENS = {ApiKeyKind.OPERATOR: "op", ApiKeyKind.ACCOUNT: "acct", ApiKeyKind.FUNCTION: "fn"}
_KINDS_BY_TOKEN = {token: kind for kind, token in TOKENS.items()}


@dataclass(frozen=True)
class MintedKey:
    kind: ApiKeyKind
    plaintext: str  # shown to its owner once, never stored
    prefix: str

    def digest(self, pepper: str) -> bytes:
        return hash_key(self.plaintext, pepper)


def _base62(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, rem = divmod(value, 62)
        chars.append(_ALPHABET[rem])
    return "".join(reversed(chars))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), _CHECKSUM_CHARS)


def mint_key(kind: ApiKeyKind) -> MintedKey:
    secret = "".join(secrets.choice(_ALPHABET) for _ in range(_SECRET_CHARS))
    body = f"kiln_{TOKENS[kind]}_{secret}"
    plaintext = f"{body}_{_checksum(body)}"
    return MintedKey(kind, plaintext, display_prefix(plaintext))


def parse_key(candidate: str) -> ApiKeyKind | None:
    """The key's kind if it is well formed and its checksum matches, else None."""
    parts = candidate.split("_")
    if len(parts) != 4 or parts[0] != "kiln":
        return None
    _, token, secret, checksum = parts
    kind = _KINDS_BY_TOKEN.get(token)
    if kind is None or len(secret) != _SECRET_CHARS or len(checksum) != _CHECKSUM_CHARS:
        return None
    if not all(c in _ALPHABET for c in secret):
        return None
    if not hmac.compare_digest(checksum, _checksum(candidate.rsplit("_", 1)[0])):
        return None
    return kind


def display_prefix(plaintext: str) -> str:
    """What lists show: the kind and the first characters of the secret."""
    head, _, _ = plaintext.rpartition("_")
    kiln, token, secret = head.split("_", 2)
    return f"{kiln}_{token}_{secret[:_PREFIX_SECRET_CHARS]}"


def hash_key(plaintext: str, pepper: str) -> bytes:
    return hmac.new(pepper.encode(), plaintext.encode(), hashlib.sha256).digest()

"""Who is calling: bearer API keys, checked against their hash in PostgreSQL.

A malformed key (wrong shape or checksum) is refused before any lookup. Verified keys are cached
in-process for a few seconds, so the warm path costs a dictionary lookup; issue 7 adds the Redis
cache, scopes and pushed revocation.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import HTTPConnection

from kiln.apikeys import hash_key, parse_key
from kiln.db.enums import ApiKeyKind
from kiln.db.models import ApiKey
from kiln.db.models_access import DEFAULT_CUSTOMER_ID
from kiln.db.session import transaction
from kiln.errors import Unauthenticated

__all__ = ["Authenticator", "Principal"]

_CACHE_TTL_S = 5.0
_CACHE_MAX = 10_000


@dataclass(frozen=True)
class Principal:
    key_id: uuid.UUID
    kind: ApiKeyKind
    customer_id: uuid.UUID | None  # None for operator keys
    function_id: uuid.UUID | None

    @property
    def owner_id(self) -> uuid.UUID:
        """The customer whose apps this key deploys and calls (operators: the default one)."""
        return self.customer_id or DEFAULT_CUSTOMER_ID


class Authenticator:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], pepper: str) -> None:
        self.sessions = sessions
        self.pepper = pepper
        self._cache: dict[str, tuple[float, Principal]] = {}

    async def authenticate(self, conn: HTTPConnection) -> Principal:
        header = conn.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        now = time.monotonic()
        # Keyed by the key itself, so a warm call skips the checksum and the HMAC; the cache
        # lives only in this process's memory, like the request that carried the key.
        cached = self._cache.get(token)
        if cached is not None and cached[0] > now and scheme.lower() == "bearer":
            return cached[1]
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("missing API key: send it as `Authorization: Bearer kiln_...`")
        if parse_key(token) is None:
            raise Unauthenticated("malformed API key: check that it was copied whole")
        principal = await self._lookup(hash_key(token, self.pepper))
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[token] = (now + _CACHE_TTL_S, principal)
        return principal

    async def _lookup(self, digest: bytes) -> Principal:
        async with transaction(self.sessions) as session:
            row = await session.scalar(
                sa.select(ApiKey).where(
                    ApiKey.key_hash == digest,
                    ApiKey.revoked_at.is_(None),
                    sa.or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > sa.func.now()),
                )
            )
        if row is None:
            raise Unauthenticated("unknown, revoked or expired API key")
        return Principal(row.id, row.kind, row.customer_id, row.function_id)

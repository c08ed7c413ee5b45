"""Who is calling: bearer API keys, checked against their hash in PostgreSQL.

A malformed key (wrong shape or checksum) is refused before any lookup, and counted. A
verdict is cached in-process for five seconds (keyed by the key itself, so a warm call costs a
dictionary lookup) and in Redis for a minute (keyed by the key's HMAC, so routers share it and
Redis never holds a usable key). Revoking a key or disabling a customer is pushed to every
router on `<ns>.access.revoked`, which drops the cached verdicts at once; a router whose NATS
link is down keeps verdicts for one second instead of five, and forgets them all when the link
comes back, since it may have missed a revocation meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import HTTPConnection

from kiln._trouble import Trouble
from kiln.apikeys import hash_key, parse_key
from kiln.db.enums import ApiKeyKind, CustomerStatus
from kiln.db.models import ApiKey, Customer
from kiln.db.models_access import DEFAULT_CUSTOMER_ID
from kiln.db.session import database_unreachable, transaction
from kiln.errors import KilnError, PermissionDenied, Unauthenticated
from kiln.router.limits import Limiter
from kiln.seal import Seals
from kiln.tiers import TierLimits

__all__ = ["SCOPE_CONSOLE", "SCOPE_CUSTOMER", "Authenticator", "Principal"]

SCOPE_CUSTOMER = "kiln.customer"  # (customer id, tier) of the request's key, in the ASGI scope
# The principal of a console user calling the API in-process (kiln.console.api). Only code
# in this process can put it in a scope: no header or cookie of a request reaches it.
SCOPE_CONSOLE = "kiln.console_principal"

_log = logging.getLogger(__name__)
_CACHE_TTL_S = 5.0
_CACHE_TTL_OFFLINE_S = 1.0  # while this router cannot hear revocations
_REDIS_TTL_S = 60
_CACHE_MAX = 10_000


@dataclass(frozen=True)
class Principal:
    key_id: uuid.UUID
    kind: ApiKeyKind
    customer_id: uuid.UUID | None  # None for operator keys
    function_id: uuid.UUID | None
    tier: str | None = None  # the customer's; None for operator keys (no limits)
    limits: TierLimits | None = None

    @property
    def owner_id(self) -> uuid.UUID:
        """The customer whose apps this key deploys and calls (operators: the default one)."""
        return self.customer_id or DEFAULT_CUSTOMER_ID


_Verdict = Principal | KilnError


class Authenticator:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        pepper: str,
        *,
        redis: Any = None,
        redis_prefix: str = "kiln:",
        on_reject: Callable[[str], None] = lambda reason: None,
        limiter: Limiter | None = None,
    ) -> None:
        self.sessions = sessions
        self.pepper = pepper
        self.redis = redis  # redis.asyncio.Redis, or None
        self.redis_prefix = redis_prefix
        self.on_reject = on_reject  # counts refusals by reason (metrics)
        self.limiter = limiter
        self.nc: NATS | None = None
        self.seals = Seals(None)  # start() gives the platform's
        self.subject = ""
        self._cache: dict[str, tuple[float, _Verdict]] = {}
        self._trouble = Trouble(_log, "checking API keys in PostgreSQL")

    async def start(self, nc: NATS, subject: str, *, seals: Seals) -> None:
        """Listen for revocations on `subject` (`Subjects.access_revoked`), sent under the
        platform's seal."""
        self.seals = seals
        self.nc = nc
        self.subject = subject
        await nc.subscribe(subject, cb=self._on_revoked)

    def on_reconnected(self) -> None:
        """NATS is back: revocations sent meanwhile were missed, so trust nothing cached."""
        self._cache.clear()

    async def authenticate(self, conn: HTTPConnection, *, count: bool = True) -> Principal:
        """The key's principal; with `count`, the request is also counted against the
        customer's limits (calls count when they take a slot: `Limiter.call_slot`). A console
        user's request is not counted: a person clicking is not a client's traffic."""
        console: Principal | None = conn.scope.get(SCOPE_CONSOLE)
        principal = console if console is not None else await self._principal(conn)
        if principal.customer_id is not None:  # refusals from here on are the customer's
            conn.scope[SCOPE_CUSTOMER] = (str(principal.customer_id), principal.tier or "")
        if count and console is None and self.limiter is not None and principal.limits is not None:
            assert principal.tier is not None
            await self.limiter.admit(str(principal.customer_id), principal.tier, principal.limits)
        return principal

    async def _principal(self, conn: HTTPConnection) -> Principal:
        header = conn.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        now = time.monotonic()
        cached = self._cache.get(token)
        if cached is not None and scheme.lower() == "bearer":
            cached_at, verdict = cached
            ttl = _CACHE_TTL_S if self.nc is None or self.nc.is_connected else _CACHE_TTL_OFFLINE_S
            if now - cached_at < ttl:
                if isinstance(verdict, KilnError):
                    raise _refusal(conn, verdict)
                return verdict
        if scheme.lower() != "bearer" or not token:
            self.on_reject("missing")
            raise Unauthenticated("missing API key: send it as `Authorization: Bearer kiln_...`")
        if parse_key(token) is None:
            self.on_reject("malformed")
            raise Unauthenticated("malformed API key: check that it was copied whole")
        try:
            verdict = await self._verdict(hash_key(token, self.pepper))
        except Exception as exc:
            # PostgreSQL is away: a key known before still answers (revocations keep arriving
            # over NATS meanwhile); an unknown one is told to retry.
            if cached is None or not database_unreachable(exc):
                raise
            self._trouble.failed(exc)
            verdict = cached[1]
            if isinstance(verdict, KilnError):
                raise _refusal(conn, verdict) from None
            return verdict
        self._trouble.ok()
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[token] = (now, verdict)
        if isinstance(verdict, KilnError):
            raise _refusal(conn, verdict)
        return verdict

    async def forget(
        self,
        *,
        key_id: uuid.UUID | None = None,
        digests: Sequence[bytes] = (),
        customer_id: uuid.UUID | None = None,
    ) -> None:
        """A key was revoked (or a customer disabled): drop the verdicts here and in Redis
        (`digests`: the HMACs of the keys concerned), and tell every other router."""
        self._drop(key_id, customer_id)
        if self.redis is not None and digests:
            with contextlib.suppress(Exception):  # they expire within a minute anyway
                await self.redis.delete(*(self._redis_key(d) for d in digests))
        if self.nc is not None:
            message = {"key_id": str(key_id) if key_id else None,
                       "customer_id": str(customer_id) if customer_id else None}  # fmt: skip
            body = json.dumps(message).encode()
            await self.nc.publish(
                self.subject, body, headers=self.seals.platform(self.subject, body)
            )

    async def _on_revoked(self, msg: Msg) -> None:
        if not self.seals.platform_sent(msg, "a key revocation"):
            return
        try:
            message = json.loads(msg.data)
            key_id = uuid.UUID(message["key_id"]) if message.get("key_id") else None
            customer = uuid.UUID(message["customer_id"]) if message.get("customer_id") else None
        except (ValueError, KeyError, TypeError):
            _log.warning("ignoring an unreadable revocation")
            return
        self._drop(key_id, customer)

    def _drop(self, key_id: uuid.UUID | None, customer_id: uuid.UUID | None) -> None:
        for token, (_, verdict) in list(self._cache.items()):
            if isinstance(verdict, Principal) and (
                verdict.key_id == key_id
                or (customer_id is not None and verdict.customer_id == customer_id)
            ):
                del self._cache[token]
        if customer_id is not None:  # its refusals may say "disabled" no longer
            self._cache = {
                t: v for t, v in self._cache.items() if not isinstance(v[1], PermissionDenied)
            }

    async def _verdict(self, digest: bytes) -> _Verdict:
        if self.redis is not None:
            try:
                stored = await self.redis.get(self._redis_key(digest))
            except Exception as exc:  # noqa: BLE001 - Redis down: PostgreSQL answers alone
                _log.warning("API key cache unreachable: %s", exc)
                stored = None
            if stored is not None:
                return _decode(stored)
        verdict = await self._lookup(digest)
        if self.redis is not None and not isinstance(verdict, Unauthenticated):
            with contextlib.suppress(Exception):
                await self.redis.set(self._redis_key(digest), _encode(verdict), ex=_REDIS_TTL_S)
        if isinstance(verdict, Unauthenticated):
            self.on_reject("unknown")
        return verdict

    async def _lookup(self, digest: bytes) -> _Verdict:
        async with transaction(self.sessions) as session:
            row = (
                await session.execute(
                    sa.select(ApiKey, Customer.status, Customer.tier, Customer.limit_overrides)
                    .outerjoin(Customer, Customer.id == ApiKey.customer_id)
                    .where(
                        ApiKey.key_hash == digest,
                        ApiKey.revoked_at.is_(None),
                        sa.or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > sa.func.now()),
                    )
                )
            ).first()
        if row is None:
            # Whose it was, if anyone's: a revoked key still in use is an abuse signal.
            async with transaction(self.sessions) as session:
                owner = (
                    await session.execute(
                        sa.select(ApiKey.customer_id, Customer.tier)
                        .join(Customer, Customer.id == ApiKey.customer_id)
                        .where(ApiKey.key_hash == digest)
                    )
                ).first()
            customer = (str(owner[0]), owner[1].value) if owner is not None else None
            return Unauthenticated("unknown, revoked or expired API key", customer=customer)
        key, status, tier, overrides = row
        if status is CustomerStatus.DISABLED:
            return PermissionDenied(
                "this account is disabled; ask the platform's operator",
                customer=(str(key.customer_id), tier.value),
            )
        return self.principal_for(
            key.id, key.kind, key.customer_id, key.function_id,
            tier.value if tier is not None else None, overrides,
        )  # fmt: skip

    def principal_for(
        self,
        key_id: uuid.UUID,
        kind: ApiKeyKind,
        customer_id: uuid.UUID | None,
        function_id: uuid.UUID | None,
        tier: str | None,
        overrides: Any,
    ) -> Principal:
        limits = None
        if customer_id is not None and tier is not None and self.limiter is not None:
            try:
                limits = self.limiter.limits_for(tier, overrides)
            except ValueError:  # stored overrides that no longer parse: the tier's own
                _log.warning("ignoring the limit overrides of customer %s", customer_id)
                limits = self.limiter.limits_for(tier, None)
        return Principal(key_id, kind, customer_id, function_id, tier, limits)

    def _redis_key(self, digest: bytes) -> str:
        return f"{self.redis_prefix}auth:{digest.hex()}"


def _refusal(conn: HTTPConnection, verdict: KilnError) -> KilnError:
    """A fresh copy of a cached refusal to raise; its customer (if known) goes in the scope."""
    customer = verdict.fields.get("customer")
    if customer is not None:
        conn.scope[SCOPE_CUSTOMER] = tuple(customer)
    return type(verdict)(verdict.message, **verdict.fields)


def _encode(verdict: _Verdict) -> str:
    if isinstance(verdict, Principal):
        return json.dumps({
            "key_id": str(verdict.key_id), "kind": verdict.kind.value,
            "customer_id": str(verdict.customer_id) if verdict.customer_id else None,
            "function_id": str(verdict.function_id) if verdict.function_id else None,
            "tier": verdict.tier,
            "limits": asdict(verdict.limits) if verdict.limits is not None else None,
        })  # fmt: skip
    return json.dumps({"disabled": verdict.message, "customer": verdict.fields.get("customer")})


def _decode(stored: bytes | str) -> _Verdict:
    data = json.loads(stored)
    if "disabled" in data:
        return PermissionDenied(data["disabled"], customer=data.get("customer"))
    return Principal(
        uuid.UUID(data["key_id"]),
        ApiKeyKind(data["kind"]),
        uuid.UUID(data["customer_id"]) if data["customer_id"] else None,
        uuid.UUID(data["function_id"]) if data["function_id"] else None,
        data.get("tier"),
        TierLimits(**data["limits"]) if data.get("limits") else None,
    )

"""Signed-in browsers: server-side sessions behind an HttpOnly, SameSite=Lax cookie (Secure
outside `kiln dev` and the tests), each with its own CSRF token for the forms.

The cookie holds 32 random bytes; PostgreSQL holds their SHA-256, so neither a leaked table nor
a leaked backup signs anyone in. A session ends when it expires (14 days after sign-in), when
its user signs out, or when the user's password changes (every session of theirs ends); a
disabled user or customer has no working session.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kiln.db.enums import CustomerStatus, UserRole
from kiln.db.models import ConsoleSession, Customer, User
from kiln.db.session import transaction

__all__ = ["COOKIE", "SESSION_TTL", "VIEWING_COOKIE", "SessionStore", "SignedIn", "token_hash"]

COOKIE = "kiln_session"
# The customer an operator is looking at. It needs no protection: only an operator's session
# reads it, and an operator may see every customer.
VIEWING_COOKIE = "kiln_viewing"
SESSION_TTL = timedelta(days=14)
# How stale `last_seen_at` may get before a request writes it again.
_SEEN_EVERY = timedelta(minutes=5)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class SignedIn:
    """Who a request's session belongs to."""

    session_id: uuid.UUID
    user_id: uuid.UUID
    email: str
    name: str
    role: UserRole
    customer_id: uuid.UUID | None  # None for operators
    customer_name: str
    tier: str | None
    limit_overrides: dict[str, object] | None
    csrf: str
    # An operator looking at a customer's pages: `customer_*` are then that customer's.
    viewing: bool = False

    @property
    def operator(self) -> bool:
        return self.role is UserRole.OPERATOR

    @property
    def owner(self) -> bool:
        """Whether the user may change the customer's money and members: its owner, or an
        operator viewing it."""
        return self.role is UserRole.OWNER or self.viewing

    @property
    def acts_for_customer(self) -> bool:
        return self.customer_id is not None


class SessionStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    async def open(self, user_id: uuid.UUID, *, address: str, user_agent: str) -> str:
        """A new session for the user; the token for its cookie."""
        token = new_token()
        async with transaction(self.sessions) as session:
            session.add(
                ConsoleSession(
                    token_hash=token_hash(token),
                    user_id=user_id,
                    csrf=secrets.token_urlsafe(24),
                    address=address[:64],
                    user_agent=user_agent[:300],
                    expires_at=datetime.now(UTC) + SESSION_TTL,
                )
            )
        return token

    async def find(self, token: str) -> SignedIn | None:
        """The live session `token` opens, or None (unknown, expired, revoked, or its user or
        customer disabled)."""
        if not token or len(token) > 100:
            return None
        now = datetime.now(UTC)
        async with transaction(self.sessions) as session:
            row = (
                await session.execute(
                    sa.select(ConsoleSession, User, Customer)
                    .join(User, ConsoleSession.user_id == User.id)
                    .outerjoin(Customer, User.customer_id == Customer.id)
                    .where(
                        ConsoleSession.token_hash == token_hash(token),
                        ConsoleSession.revoked_at.is_(None),
                        ConsoleSession.expires_at > now,
                        User.disabled_at.is_(None),
                        User.verified_at.is_not(None),
                    )
                )
            ).first()
            if row is None:
                return None
            found, user, customer = row
            if customer is not None and customer.status is not CustomerStatus.ACTIVE:
                return None
            if now - found.last_seen_at > _SEEN_EVERY:
                found.last_seen_at = now
        return SignedIn(
            session_id=found.id,
            user_id=user.id,
            email=user.email,
            name=user.name,
            role=user.role,
            customer_id=user.customer_id,
            customer_name=customer.name if customer is not None else "",
            tier=customer.tier.value if customer is not None else None,
            limit_overrides=customer.limit_overrides if customer is not None else None,
            csrf=found.csrf,
        )

    async def viewing(self, user: SignedIn, customer_id: str) -> SignedIn:
        """An operator's session looking at the customer `customer_id` (the operator's own
        view when there is no such customer)."""
        try:
            wanted = uuid.UUID(customer_id)
        except ValueError:
            return user
        async with transaction(self.sessions) as session:
            customer = await session.get(Customer, wanted)
        if customer is None:
            return user
        return dataclasses.replace(
            user,
            customer_id=customer.id,
            customer_name=customer.name,
            tier=customer.tier.value,
            limit_overrides=customer.limit_overrides,
            viewing=True,
        )

    async def revoke(self, session_id: uuid.UUID) -> None:
        async with transaction(self.sessions) as session:
            await session.execute(
                sa.update(ConsoleSession)
                .where(ConsoleSession.id == session_id, ConsoleSession.revoked_at.is_(None))
                .values(revoked_at=sa.func.now())
            )


async def revoke_all(session: AsyncSession, user_id: uuid.UUID) -> None:
    """End every session of the user (a new password), in the caller's transaction."""
    await session.execute(
        sa.update(ConsoleSession)
        .where(ConsoleSession.user_id == user_id, ConsoleSession.revoked_at.is_(None))
        .values(revoked_at=sa.func.now())
    )

"""Console accounts: registering (a new customer on the free tier and its owner), confirming an
address, signing in, resetting a password, inviting a member, and the operator `kiln dev`
makes. Each mailed link carries a random token that works once and expires; the database keeps
only its hash.

What an answer says never tells a stranger whether an address has an account: registering a
taken address and asking to reset an unknown one answer as if all went well (the mail, if any,
goes to the address's owner).
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kiln.billing.ledger import Changes
from kiln.console import passwords
from kiln.console.mail import Mail, Mailer
from kiln.console.sessions import new_token, revoke_all, token_hash
from kiln.db.enums import CustomerTier, MailPurpose, UserRole
from kiln.db.models import MailToken, User
from kiln.db.models_console import EMAIL_CHARS
from kiln.db.session import transaction
from kiln.errors import InvalidRequest, NotFound, PermissionDenied, Unauthenticated

__all__ = ["Accounts", "Customers", "Member", "email_problem", "normal_email"]

_log = logging.getLogger("kiln.console")

LINK_TTL = {
    MailPurpose.VERIFY: timedelta(days=2),
    MailPurpose.RESET: timedelta(hours=1),
    MailPurpose.INVITE: timedelta(days=7),
}
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]+")


class Customers(Protocol):
    """Makes customers the way the control API does (kiln.router.access.CustomerMaker): the
    console's registration and `POST /v1/customers` share it."""

    async def add(self, session: AsyncSession, name: str, plan: str, changes: Changes) -> uuid.UUID:
        """A new customer on `plan`, in the caller's transaction; billing blocks it sets go to
        `changes`."""

    async def announce(self, changes: Changes) -> None:
        """Tell the routers about the blocks in `changes`, once committed."""


def normal_email(raw: str) -> str:
    return raw.strip().lower()


def email_problem(email: str) -> str | None:
    if len(email) > EMAIL_CHARS:
        return f"an address has at most {EMAIL_CHARS} characters"
    if not _EMAIL.fullmatch(email):
        return f"{email!r} is not an email address (name@example.com)"
    return None


@dataclass(frozen=True)
class Member:
    email: str
    name: str
    role: UserRole
    verified: bool
    active: bool


@dataclass(frozen=True)
class Accounts:
    sessions: async_sessionmaker[AsyncSession]
    mailer: Mailer
    customers: Customers

    # Registering and confirming -----------------------------------------------------------

    async def register(
        self, *, email: str, password: str, name: str, organisation: str, base_url: str
    ) -> None:
        """A customer named `organisation` on the free tier, its owner (unconfirmed), and the
        mail that confirms the address. A taken address gets a mail saying so instead."""
        email = _checked_email(email)
        if (problem := passwords.problem(password)) is not None:
            raise InvalidRequest(f"password: {problem}", field="password")
        organisation = organisation.strip() or email.partition("@")[2]
        hashed = await passwords.hash_password(password)
        changes = Changes()
        try:
            async with transaction(self.sessions) as session:
                customer_id = await self.customers.add(
                    session, organisation[:200], CustomerTier.FREE.value, changes
                )
                user = User(
                    customer_id=customer_id,
                    role=UserRole.OWNER,
                    email=email,
                    name=name.strip()[:200],
                    password_hash=hashed,
                )
                session.add(user)
                await session.flush()
                token = _link(session, MailPurpose.VERIFY, email, user_id=user.id)
        except IntegrityError:
            await self.mailer.send(Mail(
                to=email, subject="You already have a Kiln account", kind="exists",
                link=f"{base_url}/console/login",
                text=("Someone (you, we hope) tried to register this address with Kiln, but it "
                      "already has an account. Sign in, or reset your password if you forgot "
                      f"it:\n\n{base_url}/console/login\n"),
            ))  # fmt: skip
            return
        await self.customers.announce(changes)
        link = f"{base_url}/console/verify?token={token}"
        await self.mailer.send(Mail(
            to=email, subject="Confirm your address for Kiln", kind="verify", link=link,
            text=(f"Welcome to Kiln. Follow this link to confirm your address (it works once, "
                  f"for two days):\n\n{link}\n"),
        ))  # fmt: skip

    async def verify(self, token: str) -> uuid.UUID:
        """Confirm the address a verify link was sent to; the user's id."""
        async with transaction(self.sessions) as session:
            link = await _use(session, token, MailPurpose.VERIFY)
            assert link.user_id is not None
            await session.execute(
                sa.update(User)
                .where(User.id == link.user_id, User.verified_at.is_(None))
                .values(verified_at=sa.func.now())
            )
            return link.user_id

    # Signing in ---------------------------------------------------------------------------

    async def sign_in(self, email: str, password: str) -> uuid.UUID:
        """The user whose address and password these are; `Unauthenticated` otherwise (the
        same words whether the address or the password is wrong)."""
        email = normal_email(email)
        async with transaction(self.sessions) as session:
            user = (
                await session.execute(sa.select(User).where(User.email == email))
            ).scalar_one_or_none()
        checked = await passwords.check(user.password_hash if user else None, password)
        if user is None or not checked.ok or user.disabled_at is not None:
            raise Unauthenticated("the address or the password is wrong")
        if user.verified_at is None:
            raise PermissionDenied(
                "confirm your address first: follow the link in the mail we sent when you "
                "registered"
            )
        if checked.rehashed is not None:
            async with transaction(self.sessions) as session:
                await session.execute(
                    sa.update(User).where(User.id == user.id).values(password_hash=checked.rehashed)
                )
        return user.id

    # Passwords ----------------------------------------------------------------------------

    async def request_reset(self, email: str, *, base_url: str) -> None:
        """Mail a reset link when the address has a user; answer the same either way."""
        email = normal_email(email)
        async with transaction(self.sessions) as session:
            user = (
                await session.execute(
                    sa.select(User).where(User.email == email, User.disabled_at.is_(None))
                )
            ).scalar_one_or_none()
            if user is None:
                return
            token = _link(session, MailPurpose.RESET, email, user_id=user.id)
        link = f"{base_url}/console/reset?token={token}"
        await self.mailer.send(Mail(
            to=email, subject="Reset your Kiln password", kind="reset", link=link,
            text=("Follow this link to choose a new password (it works once, for an hour). If "
                  f"you did not ask for it, ignore this mail.\n\n{link}\n"),
        ))  # fmt: skip

    async def reset(self, token: str, password: str) -> uuid.UUID:
        """Set a new password through a reset link; every session of the user ends. A reset
        also confirms the address (the link reached it)."""
        if (problem := passwords.problem(password)) is not None:
            raise InvalidRequest(f"password: {problem}", field="password")
        hashed = await passwords.hash_password(password)
        async with transaction(self.sessions) as session:
            link = await _use(session, token, MailPurpose.RESET)
            assert link.user_id is not None
            await session.execute(
                sa.update(User)
                .where(User.id == link.user_id)
                .values(
                    password_hash=hashed,
                    verified_at=sa.func.coalesce(User.verified_at, sa.func.now()),
                )
            )
            await revoke_all(session, link.user_id)
            return link.user_id

    # Members ------------------------------------------------------------------------------

    async def invite(
        self, *, customer_id: uuid.UUID, inviter: str, email: str, base_url: str
    ) -> None:
        """Mail `email` a link to join the customer as a member."""
        email = _checked_email(email)
        async with transaction(self.sessions) as session:
            taken = await session.scalar(sa.select(User.id).where(User.email == email))
            if taken is not None:
                raise InvalidRequest(
                    f"{email} already has a Kiln account; a user belongs to one customer",
                    field="email",
                )
            token = _link(
                session, MailPurpose.INVITE, email, customer_id=customer_id, role=UserRole.MEMBER
            )
        link = f"{base_url}/console/join?token={token}"
        await self.mailer.send(Mail(
            to=email, subject=f"{inviter} invited you to Kiln", kind="invite", link=link,
            text=(f"{inviter} invited you to their organisation on Kiln. Follow this link to "
                  f"choose a password and join (it works once, for seven days):\n\n{link}\n"),
        ))  # fmt: skip

    async def join(self, token: str, *, password: str, name: str) -> uuid.UUID:
        """Create the invited user (confirmed: the link reached the address); their id."""
        if (problem := passwords.problem(password)) is not None:
            raise InvalidRequest(f"password: {problem}", field="password")
        hashed = await passwords.hash_password(password)
        try:
            async with transaction(self.sessions) as session:
                link = await _use(session, token, MailPurpose.INVITE)
                assert link.role is not None
                user = User(
                    customer_id=link.customer_id,
                    role=link.role,
                    email=link.email,
                    name=name.strip()[:200],
                    password_hash=hashed,
                    verified_at=datetime.now(UTC),
                )
                session.add(user)
                await session.flush()
                return user.id
        except IntegrityError:
            raise InvalidRequest(
                "this address already has a Kiln account; sign in with it instead",
                field="email",
            ) from None

    async def members(self, customer_id: uuid.UUID) -> list[Member]:
        """The customer's users, the owner first."""
        async with transaction(self.sessions) as session:
            users = (
                await session.execute(
                    sa.select(User)
                    .where(User.customer_id == customer_id)
                    .order_by(User.role != UserRole.OWNER, User.created_at)
                )
            ).scalars()
            return [
                Member(u.email, u.name, u.role, u.verified_at is not None, u.disabled_at is None)
                for u in users
            ]


def _checked_email(raw: str) -> str:
    email = normal_email(raw)
    if (problem := email_problem(email)) is not None:
        raise InvalidRequest(f"email: {problem}", field="email")
    return email


def _link(
    session: AsyncSession,
    purpose: MailPurpose,
    email: str,
    *,
    user_id: uuid.UUID | None = None,
    customer_id: uuid.UUID | None = None,
    role: UserRole | None = None,
) -> str:
    """A new one-time link's token (its row added to the caller's transaction)."""
    token = new_token()
    session.add(
        MailToken(
            token_hash=token_hash(token),
            purpose=purpose,
            user_id=user_id,
            customer_id=customer_id,
            email=email,
            role=role,
            expires_at=datetime.now(UTC) + LINK_TTL[purpose],
        )
    )
    return token


async def _use(session: AsyncSession, token: str, purpose: MailPurpose) -> MailToken:
    """Mark the link used and return it; `NotFound` when it is unknown, used or expired."""
    if not token or len(token) > 100:
        raise NotFound("this link is not valid")
    link = (
        await session.execute(
            sa.update(MailToken)
            .where(
                MailToken.token_hash == token_hash(token),
                MailToken.purpose == purpose,
                MailToken.used_at.is_(None),
                MailToken.expires_at > sa.func.now(),
            )
            .values(used_at=sa.func.now())
            .returning(MailToken)
        )
    ).scalar_one_or_none()
    if link is None:
        raise NotFound("this link has expired or was used already; ask for a new one")
    return link

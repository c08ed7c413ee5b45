"""Who uses the web console: users (each an owner or member of one customer, or an operator),
their sessions, and the one-time links mailed to them. Secrets are stored only as hashes: the
session cookie's and each link's token as SHA-256, passwords as argon2id."""

from __future__ import annotations

import uuid
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from kiln.db.base import Base, CreatedAt, Timestamps, str_enum, uuid_pk
from kiln.db.enums import MailPurpose, UserRole

__all__ = ["TOKEN_HASH_BYTES", "ConsoleSession", "MailToken", "User"]

TOKEN_HASH_BYTES = 32  # SHA-256
EMAIL_CHARS = 320  # RFC 5321: 64 for the local part, @, 255 for the domain


class User(Timestamps, Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = uuid_pk()
    # NULL for operators, who belong to the platform rather than a customer.
    customer_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("customers.id", ondelete="CASCADE"), index=True
    )
    role: Mapped[UserRole] = mapped_column(str_enum(UserRole, "role"))
    # Kept lowercased, so that one address is one user however it is typed.
    email: Mapped[str] = mapped_column(sa.String(EMAIL_CHARS), unique=True)
    name: Mapped[str] = mapped_column(sa.String(200), default="", server_default="")
    password_hash: Mapped[str] = mapped_column(sa.String(200))
    verified_at: Mapped[datetime | None]
    disabled_at: Mapped[datetime | None]

    __table_args__ = (
        sa.CheckConstraint(
            "(role = 'operator') = (customer_id IS NULL)", name="owner_matches_role"
        ),
        sa.CheckConstraint("email = lower(email)", name="email_lowercase"),
    )


class ConsoleSession(CreatedAt, Base):
    """A signed-in browser. The cookie holds a random token; the row its hash, so a leaked
    table signs nobody in. Signing out or a password change revokes the row."""

    __tablename__ = "console_sessions"

    id: Mapped[uuid.UUID] = uuid_pk()
    token_hash: Mapped[bytes] = mapped_column(sa.LargeBinary(TOKEN_HASH_BYTES), unique=True)
    user_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    # The session's CSRF token: every form carries it, and a post without it is refused.
    csrf: Mapped[str] = mapped_column(sa.String(64))
    address: Mapped[str] = mapped_column(sa.String(64), default="", server_default="")
    user_agent: Mapped[str] = mapped_column(sa.String(300), default="", server_default="")
    last_seen_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]

    __table_args__ = (
        sa.CheckConstraint(
            f"octet_length(token_hash) = {TOKEN_HASH_BYTES}", name="token_hash_length"
        ),
    )


class MailToken(CreatedAt, Base):
    """A link sent by mail: verify an address, reset a password, or join a customer. Used
    once (`used_at`), and only before `expires_at`."""

    __tablename__ = "mail_tokens"

    id: Mapped[uuid.UUID] = uuid_pk()
    token_hash: Mapped[bytes] = mapped_column(sa.LargeBinary(TOKEN_HASH_BYTES), unique=True)
    purpose: Mapped[MailPurpose] = mapped_column(str_enum(MailPurpose, "purpose"))
    # The user it is for (verify, reset); NULL for an invitation, whose user does not exist yet.
    user_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    # An invitation's customer, address and role.
    customer_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("customers.id", ondelete="CASCADE"), index=True
    )
    email: Mapped[str] = mapped_column(sa.String(EMAIL_CHARS))
    role: Mapped[UserRole | None] = mapped_column(str_enum(UserRole, "invited_role"))
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]

    __table_args__ = (
        sa.CheckConstraint(
            f"octet_length(token_hash) = {TOKEN_HASH_BYTES}", name="token_hash_length"
        ),
        sa.CheckConstraint("(purpose = 'invite') = (user_id IS NULL)", name="user_matches_purpose"),
        sa.CheckConstraint(
            "(purpose = 'invite') = (customer_id IS NOT NULL AND role IS NOT NULL)",
            name="invite_complete",
        ),
    )

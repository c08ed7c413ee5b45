"""The web console's accounts: users (owners and members of customers, and operators), their
sessions, and the one-time links mailed to them.

Revision ID: 0010
Revises: 0009

Frozen like 0001: every type and constraint spelled out, closed sets as VARCHAR(32) with a
named CHECK constraint.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ROLES = ("owner", "member", "operator")


def _check(table: str, name: str, sql: str) -> sa.CheckConstraint:
    return sa.CheckConstraint(sql, name=op.f(f"ck_{table}_{name}"))


def _choice(table: str, name: str, column: str, values: Sequence[str]) -> sa.CheckConstraint:
    allowed = ", ".join(f"'{v}'" for v in values)
    return _check(table, name, f"{column} IN ({allowed})")


def _ts(name: str, *, now: bool = False) -> sa.Column[object]:
    if now:
        return sa.Column(
            name, sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        )
    return sa.Column(name, sa.DateTime(timezone=True), nullable=True)


def _fk(table: str, column: str, target: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], [f"{target}.id"], name=op.f(f"fk_{table}_{column}_{target}"), ondelete="CASCADE"
    )


def _keys(table: str, unique: str) -> list[sa.Constraint]:
    return [
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}")),
        sa.UniqueConstraint(unique, name=op.f(f"uq_{table}_{unique}")),
    ]


def _index(table: str, column: str) -> None:
    op.create_index(op.f(f"ix_{table}_{column}"), table, [column])


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("customer_id", sa.Uuid(), nullable=True),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("name", sa.String(length=200), server_default="", nullable=False),
        sa.Column("password_hash", sa.String(length=200), nullable=False),
        _ts("verified_at"),
        _ts("disabled_at"),
        _ts("created_at", now=True),
        _ts("updated_at", now=True),
        _choice("users", "role", "role", _ROLES),
        _check("users", "owner_matches_role", "(role = 'operator') = (customer_id IS NULL)"),
        _check("users", "email_lowercase", "email = lower(email)"),
        _fk("users", "customer_id", "customers"),
        *_keys("users", "email"),
    )
    _index("users", "customer_id")
    op.create_table(
        "console_sessions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("token_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("csrf", sa.String(length=64), nullable=False),
        sa.Column("address", sa.String(length=64), server_default="", nullable=False),
        sa.Column("user_agent", sa.String(length=300), server_default="", nullable=False),
        _ts("last_seen_at", now=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        _ts("revoked_at"),
        _ts("created_at", now=True),
        _check("console_sessions", "token_hash_length", "octet_length(token_hash) = 32"),
        _fk("console_sessions", "user_id", "users"),
        *_keys("console_sessions", "token_hash"),
    )
    _index("console_sessions", "user_id")
    op.create_table(
        "mail_tokens",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("token_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column("customer_id", sa.Uuid(), nullable=True),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        _ts("used_at"),
        _ts("created_at", now=True),
        _choice("mail_tokens", "purpose", "purpose", ("verify", "reset", "invite")),
        _choice("mail_tokens", "invited_role", "role", _ROLES),
        _check("mail_tokens", "token_hash_length", "octet_length(token_hash) = 32"),
        _check("mail_tokens", "user_matches_purpose", "(purpose = 'invite') = (user_id IS NULL)"),
        _check(
            "mail_tokens",
            "invite_complete",
            "(purpose = 'invite') = (customer_id IS NOT NULL AND role IS NOT NULL)",
        ),
        _fk("mail_tokens", "user_id", "users"),
        _fk("mail_tokens", "customer_id", "customers"),
        *_keys("mail_tokens", "token_hash"),
    )
    _index("mail_tokens", "user_id")
    _index("mail_tokens", "customer_id")


def downgrade() -> None:
    op.drop_table("mail_tokens")
    op.drop_table("console_sessions")
    op.drop_table("users")

"""First-run records a fresh installation needs: the operator key that `kiln dev` hands to the
CLI through config.toml, and the operator user that signs in to its console."""

from __future__ import annotations

import secrets
import uuid

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from kiln.apikeys import hash_key, mint_key, parse_key
from kiln.db.enums import ApiKeyKind, UserRole
from kiln.db.models import ApiKey, User
from kiln.db.session import create_engine, session_factory, transaction
from kiln.errors import InvalidRequest
from kiln.settings import Settings

__all__ = ["CONSOLE_OPERATOR", "ensure_console_operator", "ensure_operator_key"]

# The console user `kiln dev` makes: an operator of the whole platform.
CONSOLE_OPERATOR = "operator@kiln.local"


async def ensure_operator_key(settings: Settings, known_key: str | None) -> str:
    """Return `known_key` if it is still a live operator key in this database, else mint and
    store a new one. Keeping the old key keeps earlier config.toml files and scripts working."""
    pepper = settings.require("api_key_pepper")
    engine = create_engine(settings, application_name="kiln-bootstrap")
    try:
        async with transaction(session_factory(engine)) as session:
            if known_key and parse_key(known_key) is ApiKeyKind.OPERATOR:
                live = await session.scalar(
                    sa.select(ApiKey.id).where(
                        ApiKey.key_hash == hash_key(known_key, pepper),
                        ApiKey.kind == ApiKeyKind.OPERATOR,
                        ApiKey.revoked_at.is_(None),
                        sa.or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > sa.func.now()),
                    )
                )
                if live is not None:
                    return known_key
            minted = mint_key(ApiKeyKind.OPERATOR)
            session.add(
                ApiKey(
                    kind=ApiKeyKind.OPERATOR,
                    key_hash=minted.digest(pepper),
                    prefix=minted.prefix,
                    name="kiln dev",
                )
            )
            return minted.plaintext
    finally:
        await engine.dispose()


async def ensure_console_operator(settings: Settings, email: str = CONSOLE_OPERATOR) -> str | None:
    """Make a console operator user with this address unless it exists; its password when it
    was made now (to be shown once), else None."""
    from kiln.console.accounts import email_problem, normal_email
    from kiln.console.passwords import hash_password

    email = normal_email(email)
    if (problem := email_problem(email)) is not None:
        raise InvalidRequest(problem)

    password = secrets.token_urlsafe(12)
    hashed = await hash_password(password)
    engine = create_engine(settings, application_name="kiln-bootstrap")
    try:
        async with transaction(session_factory(engine)) as session:
            made = await session.execute(
                insert(User)
                .values(
                    id=uuid.uuid4(),
                    role=UserRole.OPERATOR,
                    email=email,
                    name="Operator",
                    password_hash=hashed,
                    verified_at=sa.func.now(),
                )
                .on_conflict_do_nothing(index_elements=[User.email])
                .returning(User.id)
            )
            return password if made.first() is not None else None
    finally:
        await engine.dispose()

"""First-run records a fresh installation needs: the operator key that `kiln dev` hands to the
CLI through config.toml."""

from __future__ import annotations

import sqlalchemy as sa

from kiln.apikeys import hash_key, mint_key, parse_key
from kiln.db.enums import ApiKeyKind
from kiln.db.models import ApiKey
from kiln.db.session import create_engine, session_factory, transaction
from kiln.settings import Settings

__all__ = ["ensure_operator_key"]


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

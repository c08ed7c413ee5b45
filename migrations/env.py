"""Alembic environment: migrations run over an async engine built from Kiln's `Settings`.

Kiln's own entry points (`kiln.db.migrate`) pass the Settings object in
`config.attributes["settings"]`. Only the plain `alembic` command line falls back to reading the
`KILN_*` variables itself.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import Connection, pool, text
from sqlalchemy.ext.asyncio import create_async_engine

import kiln.db.models  # noqa: F401 - registers every table on Base.metadata
from kiln.db.base import Base
from kiln.settings import Settings

# Processes that start together (several routers, `kiln dev` and a test) may all try to migrate;
# a transaction-scoped advisory lock makes them take turns, and the later ones find nothing to do.
_MIGRATION_LOCK_KEY = 0x6B696C6E  # "kiln"

config = context.config
_FROM_KILN = "settings" in config.attributes

if not _FROM_KILN and config.config_file_name is not None:
    # The host application owns logging when it calls Alembic; the bare CLI uses alembic.ini's.
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _settings() -> Settings:
    if _FROM_KILN:
        settings: Settings = config.attributes["settings"]
        return settings
    return Settings.from_env(os.environ)


def _configure(**options: Any) -> None:
    context.configure(
        target_metadata=Base.metadata,
        compare_type=True,
        compare_server_default=True,
        **options,
    )


def _run_offline() -> None:
    # `alembic upgrade --sql` writes SQL for a DBA to review; it needs no database at all.
    _configure(dialect_name="postgresql", literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _run_sync(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        # Bounded waits: a stuck peer or a long-running query holding a table fails the
        # migration with a message instead of hanging every starting process.
        connection.execute(text("SET LOCAL lock_timeout = '60s'"))
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        context.run_migrations()


async def _run_online(settings: Settings) -> None:
    engine = create_async_engine(
        settings.sqlalchemy_url,
        poolclass=pool.NullPool,
        connect_args={
            "timeout": settings.connect_timeout_s,
            "server_settings": {"application_name": "kiln-migrate"},
        },
    )
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_sync)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    _run_offline()
else:
    asyncio.run(_run_online(_settings()))

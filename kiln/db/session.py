"""Engines and sessions. One engine per process, built from `Settings`, disposed at shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine

from kiln.settings import Settings

__all__ = ["create_engine", "database_unreachable", "session_factory", "transaction"]


def create_engine(settings: Settings, *, application_name: str = "kiln") -> AsyncEngine:
    """The process's async engine. `application_name` shows in `pg_stat_activity`."""
    return _create_async_engine(
        settings.sqlalchemy_url,
        pool_size=settings.db_pool_size,
        # KILN_DB_POOL_SIZE is documented as the connections per process, so it is a hard cap.
        max_overflow=0,
        # Waiting for a free pooled connection is a wait like any other: bound it.
        pool_timeout=settings.connect_timeout_s,
        # A failover or idle-timeout on the server leaves dead sockets in the pool.
        pool_pre_ping=True,
        connect_args={
            "timeout": settings.connect_timeout_s,
            "server_settings": {"application_name": application_name},
        },
    )


# Connection exceptions, operator intervention (shutdown, starting up), insufficient resources.
_UNREACHABLE_STATES = ("08", "57P", "53")


def database_unreachable(exc: BaseException) -> bool:
    """Whether `exc` says PostgreSQL cannot be reached just now (down, restarting, out of
    pooled connections), as opposed to a query it refused: callers then serve from a cache,
    or answer "retry"."""
    from sqlalchemy import exc as sa_exc

    if type(exc).__module__.partition(".")[0] == "nats":
        return False  # nats-py's timeouts are TimeoutErrors too, and say nothing of PostgreSQL
    if isinstance(exc, sa_exc.DBAPIError) and not isinstance(
        exc, (sa_exc.OperationalError, sa_exc.InterfaceError)
    ):
        # What asyncpg raises while the server starts or stops ("the database system is
        # starting up", an administrator's shutdown, too many connections) arrives as a plain
        # DBAPIError: its SQLSTATE class tells.
        state = str(getattr(exc.orig, "sqlstate", "") or "")
        return exc.connection_invalidated or state.startswith(_UNREACHABLE_STATES)
    return isinstance(
        exc,
        (OSError, TimeoutError, sa_exc.OperationalError, sa_exc.InterfaceError,
         sa_exc.TimeoutError),
    )  # fmt: skip


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # expire_on_commit=False: objects stay readable after commit, since an async session cannot
    # reload expired attributes on access.
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def transaction(
    sessions: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """A session inside one transaction: committed when the block exits normally, rolled back
    when it raises (cancellation included)."""
    async with sessions() as session, session.begin():
        yield session

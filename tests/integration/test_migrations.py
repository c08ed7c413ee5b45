"""Migrations against a real PostgreSQL, and the invariants the migrated schema enforces.

These tests downgrade to base, so they run on a database of their own (`migration_db_url`),
never on the session's shared one; each test starts from an empty `public` schema.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kiln.db import migrate
from kiln.db.enums import ApiKeyKind, LedgerKind
from kiln.db.models import (
    ApiKey,
    App,
    AppVersion,
    Base,
    Customer,
    Function,
    LedgerEntry,
    Node,
    Replica,
    UsageEvent,
)
from kiln.db.models_access import DEFAULT_CUSTOMER_ID
from kiln.db.session import create_engine, session_factory, transaction
from kiln.errors import InternalError
from kiln.settings import Settings

pytestmark = pytest.mark.integration


Snapshot = dict[str, list[tuple[Any, ...]]]


# Fixtures ----------------------------------------------------------------------------------------


async def _admin(url: str, statement: str) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def migration_db_url(settings: Settings) -> AsyncIterator[str]:
    """A database of this module's own, on the server of the session's database."""
    server = make_url(settings.require("database_url"))
    admin = server.render_as_string(hide_password=False)
    name = f"kiln_mig_{secrets.token_hex(5)}"
    await _admin(admin, f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        await _admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def blank(settings: Settings, migration_db_url: str) -> Settings:
    """Settings for the module's database, its `public` schema emptied (even of alembic_version)."""
    await _admin(migration_db_url, "DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    return settings.replace(database_url=migration_db_url)


@pytest.fixture
def migrated(blank: Settings) -> Settings:
    migrate.upgrade(blank)
    return blank


@pytest.fixture
async def sessions(migrated: Settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(migrated)
    try:
        yield session_factory(engine)
    finally:
        await engine.dispose()


async def snapshot(url: str) -> Snapshot:
    """Everything in the `public` schema, as PostgreSQL itself spells it."""
    queries = {
        "tables": "SELECT relname, relkind::text FROM pg_class"
        " WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p', 'v', 'm', 'f')",
        "sequences": "SELECT relname FROM pg_class"
        " WHERE relnamespace = 'public'::regnamespace AND relkind = 'S'",
        "columns": "SELECT table_name, column_name, data_type, udt_name, character_maximum_length,"
        " is_nullable, column_default, is_identity, identity_generation"
        " FROM information_schema.columns WHERE table_schema = 'public'",
        "constraints": "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)"
        " FROM pg_constraint WHERE connamespace = 'public'::regnamespace",
        "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes"
        " WHERE schemaname = 'public'",
        # Table row types and their array types go with the tables; anything else (a native
        # enum, a domain) would be a leftover.
        "types": "SELECT typname FROM pg_type"
        " WHERE typnamespace = 'public'::regnamespace AND typtype IN ('e', 'd', 'r', 'm', 'b')"
        " AND typcategory <> 'A'",
        "functions": "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace",
    }
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return {
            name: sorted(tuple(row) for row in await conn.fetch(sql))
            for name, sql in queries.items()
        }
    finally:
        await conn.close()


def without_alembic(snap: Snapshot) -> Snapshot:
    def keep(row: tuple[Any, ...]) -> bool:
        return "alembic_version" not in row[:2] and row[:1] != ("alembic_version_pkc",)

    return {name: [row for row in rows if keep(row)] for name, rows in snap.items()}


def table_names(snap: Snapshot) -> set[str]:
    return {row[0] for row in snap["tables"]}


# Upgrade, check, downgrade -----------------------------------------------------------------------


async def test_upgrade_creates_every_table(blank: Settings, migration_db_url: str) -> None:
    assert migrate.current(blank) is None

    migrate.upgrade(blank)

    assert migrate.current(blank) == migrate.head(blank)
    # test_models pins the list of tables; here the migration must create exactly those.
    assert table_names(await snapshot(migration_db_url)) == set(Base.metadata.tables) | {
        "alembic_version"
    }


async def test_migrations_build_exactly_the_models_schema(
    blank: Settings, migration_db_url: str
) -> None:
    # Alembic's check compares columns and indexes but not CHECK constraints or FK actions, so
    # the whole schema is compared: built from the models, then built by the migrations.
    engine = create_engine(blank)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
    finally:
        await engine.dispose()
    from_models = await snapshot(migration_db_url)
    await _admin(migration_db_url, "DROP SCHEMA public CASCADE; CREATE SCHEMA public")

    migrate.upgrade(blank)

    from_migrations = without_alembic(await snapshot(migration_db_url))
    for part in from_models:
        assert from_migrations[part] == from_models[part], part


def test_check_finds_no_drift_after_upgrade(migrated: Settings) -> None:
    migrate.check(migrated)


async def test_check_reports_drift(migrated: Settings, migration_db_url: str) -> None:
    await _admin(migration_db_url, "DROP INDEX ix_calls_status_expires_at")

    with pytest.raises(InternalError, match="differs from Kiln's models") as caught:
        migrate.check(migrated)

    assert "ix_calls_status_expires_at" in caught.value.message


async def test_downgrade_to_base_leaves_an_empty_database(
    blank: Settings, migration_db_url: str
) -> None:
    migrate.upgrade(blank)

    migrate.downgrade(blank, "base")

    assert migrate.current(blank) is None
    left = await snapshot(migration_db_url)
    assert table_names(left) == {"alembic_version"}
    assert without_alembic(left) == {name: [] for name in left}


async def test_round_trip(blank: Settings, migration_db_url: str) -> None:
    migrate.upgrade(blank)
    first = await snapshot(migration_db_url)

    migrate.downgrade(blank, "base")
    migrate.upgrade(blank)

    assert await snapshot(migration_db_url) == first
    migrate.check(blank)


async def test_every_revision_downgrades_to_exactly_its_predecessor(
    blank: Settings, migration_db_url: str
) -> None:
    script = ScriptDirectory.from_config(migrate.alembic_config(blank))
    revisions = list(reversed(list(script.walk_revisions("base", "heads"))))
    assert revisions, "no migrations found"

    for revision in revisions:
        before = without_alembic(await snapshot(migration_db_url))
        migrate.upgrade(blank, revision.revision)
        after = await snapshot(migration_db_url)
        assert migrate.current(blank) == revision.revision

        migrate.downgrade(blank, str(revision.down_revision or "base"))
        assert without_alembic(await snapshot(migration_db_url)) == before, revision.revision

        migrate.upgrade(blank, revision.revision)
        assert await snapshot(migration_db_url) == after, revision.revision


def test_upgrade_twice_is_a_no_op(migrated: Settings) -> None:
    migrate.upgrade(migrated)

    assert migrate.current(migrated) == migrate.head(migrated)


# Invariants the schema enforces ------------------------------------------------------------------


def _digest() -> str:
    return secrets.token_hex(32)


async def _deployed(sessions: async_sessionmaker[AsyncSession]) -> tuple[Customer, Function]:
    """A customer with one app, one version and one function, inserted in one flush."""
    async with transaction(sessions) as session:
        customer = Customer(name="Acme")
        session.add(customer)
        await session.flush()
        app = App(customer_id=customer.id, name="tts")
        version = AppVersion(version=1, source_digest=_digest(), artifact_key="code/1")
        app.versions.append(version)
        app.current_version = version
        function = Function(name="shout", current_version=version)
        app.functions.append(function)
        session.add(app)
    return customer, function


async def test_app_version_cycle_and_server_values(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    customer, function = await _deployed(sessions)

    async with transaction(sessions) as session:
        app = await session.scalar(sa.select(App).where(App.customer_id == customer.id))
        assert app is not None
        assert app.current_version_id == function.current_version_id
    # Server-side values come back with the INSERT: reading them needs no lazy load.
    assert customer.created_at.tzinfo is not None
    assert customer.balance_micros == 0
    assert function.overridden == []
    assert (function.min_replicas, function.max_replicas, function.concurrency) == (0, 4, 1)


SCALING_VIOLATIONS: list[tuple[dict[str, Any], tuple[str, ...]]] = [
    ({"min_replicas": 5, "max_replicas": 2}, ("max_replicas_at_least_min",)),
    ({"min_replicas": -1}, ("min_replicas_nonnegative",)),
    ({"min_replicas": 0, "max_replicas": 0}, ("max_replicas_positive",)),
    ({"buffer_replicas": -1}, ("buffer_replicas_nonnegative",)),
    ({"concurrency": 0}, ("concurrency_positive", "target_concurrency_range")),
    ({"concurrency": 2, "target_concurrency": 3}, ("target_concurrency_range",)),
    ({"target_concurrency": 0}, ("target_concurrency_range",)),
    ({"idle_timeout_s": -1}, ("idle_timeout_nonnegative",)),
    ({"timeout_s": 0}, ("timeout_positive",)),
    ({"startup_timeout_s": 0}, ("startup_timeout_positive",)),
    ({"retries": -1}, ("retries_nonnegative",)),
    ({"memory_mb": 0}, ("memory_mb_positive",)),
    ({"overridden": ["min_replicas", "colour"]}, ("overridden_known",)),
]


@pytest.mark.parametrize(("values", "constraints"), SCALING_VIOLATIONS)
async def test_scaling_checks_reject_bad_values(
    sessions: async_sessionmaker[AsyncSession],
    values: dict[str, Any],
    constraints: tuple[str, ...],
) -> None:
    _, function = await _deployed(sessions)

    with pytest.raises(IntegrityError) as caught:
        async with transaction(sessions) as session:
            session.add(
                Function(
                    app_id=function.app_id,
                    name="bad",
                    current_version_id=function.current_version_id,
                    **values,
                )
            )

    assert any(f"ck_functions_{name}" in str(caught.value) for name in constraints)


async def test_live_settings_within_bounds_are_accepted(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    _, function = await _deployed(sessions)

    async with transaction(sessions) as session:
        row = await session.get_one(Function, function.id)
        row.min_replicas, row.max_replicas, row.idle_timeout_s = 2, 2, 0
        row.concurrency, row.target_concurrency = 8, 6
        row.overridden = ["min_replicas", "max_replicas", "idle_timeout_s"]

    assert row.updated_at >= row.created_at


def _usage_event(customer: Customer, function: Function, replica_id: uuid.UUID) -> UsageEvent:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    return UsageEvent(
        id=f"{replica_id}:1",
        replica_id=replica_id,
        customer_id=customer.id,
        function_id=function.id,
        gpu_type="A10G",
        gpu_count=1,
        period_start=start,
        period_end=start + timedelta(seconds=5),
        duration_ms=5000,
    )


async def test_a_replayed_usage_event_is_rejected(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    customer, function = await _deployed(sessions)
    replica_id = uuid.uuid4()
    async with transaction(sessions) as session:
        session.add(_usage_event(customer, function, replica_id))

    with pytest.raises(IntegrityError, match="pk_usage_events"):
        async with transaction(sessions) as session:
            session.add(_usage_event(customer, function, replica_id))


async def test_an_event_is_charged_at_most_once(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    customer, function = await _deployed(sessions)
    event = _usage_event(customer, function, uuid.uuid4())

    def charge() -> LedgerEntry:
        return LedgerEntry(
            customer_id=customer.id,
            kind=LedgerKind.USAGE,
            amount_micros=-1250,
            usage_event_id=event.id,
        )

    async with transaction(sessions) as session:
        session.add(event)
        await session.flush()
        session.add(charge())

    with pytest.raises(IntegrityError, match="uq_ledger_entries_usage_event_id"):
        async with transaction(sessions) as session:
            session.add(charge())


LEDGER_VIOLATIONS: list[tuple[dict[str, Any], str]] = [
    ({"kind": LedgerKind.USAGE, "amount_micros": -5}, "usage_has_event"),
    ({"kind": LedgerKind.TOPUP, "amount_micros": -5}, "topup_is_credit"),
    ({"kind": LedgerKind.REFILL, "amount_micros": 0}, "topup_is_credit"),
]


@pytest.mark.parametrize(("values", "constraint"), LEDGER_VIOLATIONS)
async def test_ledger_checks(
    sessions: async_sessionmaker[AsyncSession], values: dict[str, Any], constraint: str
) -> None:
    customer, _ = await _deployed(sessions)

    with pytest.raises(IntegrityError, match=f"ck_ledger_entries_{constraint}"):
        async with transaction(sessions) as session:
            session.add(LedgerEntry(customer_id=customer.id, **values))


async def test_a_customer_with_money_history_cannot_be_deleted(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    customer, _ = await _deployed(sessions)
    async with transaction(sessions) as session:
        session.add(
            LedgerEntry(
                customer_id=customer.id,
                kind=LedgerKind.TOPUP,
                amount_micros=10_000_000,
                external_id="pi_123",
            )
        )

    with pytest.raises(IntegrityError, match="fk_ledger_entries_customer_id_customers"):
        async with transaction(sessions) as session:
            await session.execute(sa.delete(Customer).where(Customer.id == customer.id))


async def test_deleting_an_app_removes_its_versions_functions_replicas_and_keys(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    customer, function = await _deployed(sessions)
    async with transaction(sessions) as session:
        session.add(Node(id="node-1", hostname="gpu-1", gpu_type="A10G", gpu_count=1))
        await session.flush()
        session.add(
            Replica(
                function_id=function.id,
                version_id=function.current_version_id,
                node_id="node-1",
                gpu_type="A10G",
                gpu_indices=[0],
            )
        )
        session.add(
            ApiKey(
                kind=ApiKeyKind.FUNCTION,
                customer_id=customer.id,
                function_id=function.id,
                key_hash=secrets.token_bytes(32),
                prefix="kiln_fn_abcdefgh",
            )
        )

    async with transaction(sessions) as session:
        await session.execute(sa.delete(App).where(App.id == function.app_id))

    async with transaction(sessions) as session:
        for model in (App, AppVersion, Function, Replica, ApiKey):
            assert await session.scalar(sa.select(sa.func.count()).select_from(model)) == 0
        assert await session.get(Node, "node-1") is not None


KEY_VIOLATIONS: list[tuple[Callable[[Customer, Function], dict[str, Any]], str]] = [
    (lambda c, f: {"kind": ApiKeyKind.OPERATOR, "customer_id": c.id}, "owner_matches_kind"),
    (lambda c, f: {"kind": ApiKeyKind.ACCOUNT}, "owner_matches_kind"),
    (
        lambda c, f: {"kind": ApiKeyKind.ACCOUNT, "customer_id": c.id, "function_id": f.id},
        "function_matches_kind",
    ),
    (lambda c, f: {"kind": ApiKeyKind.FUNCTION, "customer_id": c.id}, "function_matches_kind"),
]


@pytest.mark.parametrize(("make", "constraint"), KEY_VIOLATIONS)
async def test_api_key_scope_matches_its_kind(
    sessions: async_sessionmaker[AsyncSession],
    make: Callable[[Customer, Function], dict[str, Any]],
    constraint: str,
) -> None:
    customer, function = await _deployed(sessions)

    with pytest.raises(IntegrityError, match=f"ck_api_keys_{constraint}"):
        async with transaction(sessions) as session:
            session.add(
                ApiKey(
                    key_hash=secrets.token_bytes(32),
                    prefix="kiln_x_abcdefgh",
                    **make(customer, function),
                )
            )


async def test_api_key_hash_must_be_32_bytes(sessions: async_sessionmaker[AsyncSession]) -> None:
    with pytest.raises(IntegrityError, match="ck_api_keys_key_hash_length"):
        async with transaction(sessions) as session:
            session.add(
                ApiKey(kind=ApiKeyKind.OPERATOR, key_hash=b"short", prefix="kiln_op_abcdefgh")
            )


async def test_transaction_rolls_back_on_error(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async def add_then_fail() -> None:
        async with transaction(sessions) as session:
            session.add(Customer(name="Ghost"))
            await session.flush()
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await add_then_fail()

    async with transaction(sessions) as session:
        ghosts = sa.select(sa.func.count()).select_from(Customer).where(Customer.name == "Ghost")
        assert await session.scalar(ghosts) == 0


async def test_default_customer_exists_after_upgrade(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with transaction(sessions) as session:
        default = await session.get(Customer, DEFAULT_CUSTOMER_ID)
        assert default is not None
        assert default.name == "default"

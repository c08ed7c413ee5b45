"""The models' conventions, checked on the metadata alone (no database)."""

from __future__ import annotations

import enum
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

import kiln
from kiln.apikeys import mint_key
from kiln.db import migrate
from kiln.db.base import NAMING_CONVENTION
from kiln.db.enums import ApiKeyKind, ScalingSetting
from kiln.db.models import Base
from kiln.errors import InternalError
from kiln.settings import Settings

TABLES = {
    "api_keys",
    "app_versions",
    "apps",
    "calls",
    "console_sessions",
    "customers",
    "daily_spend",
    "functions",
    "invocations",
    "invoice_counter",
    "invoice_lines",
    "invoices",
    "pods",
    "storage_charges",
    "ledger_entries",
    "mail_tokens",
    "nodes",
    "payments",
    "period_closes",
    "period_requests",
    "plans",
    "replicas",
    "stripe_events",
    "stripe_outbox",
    "usage_events",
    "users",
}
MAX_IDENTIFIER = 63  # PostgreSQL truncates longer names, which would break name-based migrations


def columns() -> list[sa.Column[object]]:
    return [column for table in Base.metadata.sorted_tables for column in table.columns]


def test_every_table_is_registered() -> None:
    assert set(Base.metadata.tables) == TABLES


def test_money_is_integer_micro_units() -> None:
    money = [c for c in columns() if c.name.endswith("_micros")]
    assert len(money) >= 6
    for column in money:
        assert type(column.type) is sa.BigInteger, column
    for column in columns():
        assert not isinstance(column.type, sa.Numeric), f"{column} could hold fractional money"


def test_byte_counters_are_bigint() -> None:
    invocations = Base.metadata.tables["invocations"]
    assert type(invocations.c.bytes_in.type) is sa.BigInteger
    assert type(invocations.c.bytes_out.type) is sa.BigInteger


def test_every_datetime_is_timezone_aware() -> None:
    times = [c for c in columns() if isinstance(c.type, sa.DateTime)]
    assert len(times) >= 20
    for column in times:
        assert isinstance(column.type, sa.DateTime)
        assert column.type.timezone, f"{column} stores naive datetimes"


def test_api_keys_cannot_hold_a_plaintext_key() -> None:
    table = Base.metadata.tables["api_keys"]
    assert set(table.columns.keys()) == {
        "id",
        "kind",
        "customer_id",
        "function_id",
        "key_hash",
        "prefix",
        "name",
        "last_used_at",
        "expires_at",
        "revoked_at",
        "created_at",
    }
    key_hash = table.c.key_hash
    assert isinstance(key_hash.type, sa.LargeBinary)
    assert key_hash.type.length == 32
    assert key_hash.unique
    # The prefix column is too short for any whole key; the minted prefix fits in it.
    prefix_type = table.c.prefix.type
    assert isinstance(prefix_type, sa.String)
    assert prefix_type.length is not None
    prefix_chars = prefix_type.length
    for kind in ApiKeyKind:
        minted = mint_key(kind)
        assert len(minted.prefix) <= prefix_chars < len(minted.plaintext)


def test_constraint_and_index_names_follow_the_convention() -> None:
    prefixes = {
        sa.PrimaryKeyConstraint: "pk_",
        sa.UniqueConstraint: "uq_",
        sa.CheckConstraint: "ck_",
        sa.ForeignKeyConstraint: "fk_",
    }
    for table in Base.metadata.sorted_tables:
        for constraint in table.constraints:
            name = str(constraint.name)
            assert name.startswith(prefixes[type(constraint)] + table.name), name
            assert len(name) <= MAX_IDENTIFIER, name
        for index in table.indexes:
            name = str(index.name)
            assert name.startswith(f"ix_{table.name}_"), name
            assert len(name) <= MAX_IDENTIFIER, name
    assert set(NAMING_CONVENTION) == {"ix", "uq", "ck", "fk", "pk"}


def test_closed_sets_are_checked_text_not_native_enums() -> None:
    enums = [c for c in columns() if isinstance(c.type, sa.Enum)]
    assert len(enums) >= 10
    for column in enums:
        kind = column.type
        assert isinstance(kind, sa.Enum)
        assert not kind.native_enum, column
        assert kind.create_constraint, column
        assert kind.enum_class is not None
        assert issubclass(kind.enum_class, enum.StrEnum)
        stored = [str(member.value) for member in kind.enum_class]
        assert kind.enums == stored
        assert all(value == value.lower() for value in stored), column
        assert all(len(value) <= (kind.length or 0) for value in stored), column


def test_uuid_primary_keys_are_generated_in_python() -> None:
    # Surrogate keys; a key that is another table's id (daily_spend.customer_id) is not made.
    uuid_pks = [
        c for c in columns()
        if c.primary_key and isinstance(c.type, sa.Uuid) and not c.foreign_keys
    ]  # fmt: skip
    assert {c.table.name for c in uuid_pks} == {
        "api_keys",
        "apps",
        "app_versions",
        "calls",
        "console_sessions",
        "customers",
        "functions",
        "invoices",
        "mail_tokens",
        "pods",
        "replicas",
        "users",
    }
    for column in uuid_pks:
        assert column.default is not None
        assert isinstance(column.default, sa.ColumnDefault)
        assert column.default.is_callable
        made = {column.default.arg(None) for _ in range(2)}
        assert len(made) == 2
        assert all(isinstance(value, uuid.UUID) and value.version == 4 for value in made)


def test_scaling_settings_are_columns_of_functions() -> None:
    function_columns = set(Base.metadata.tables["functions"].columns.keys())
    assert {setting.value for setting in ScalingSetting} <= function_columns


@pytest.mark.parametrize(
    "name",
    [
        "min_replicas_nonnegative",
        "max_replicas_positive",
        "max_replicas_at_least_min",
        "buffer_replicas_nonnegative",
        "idle_timeout_nonnegative",
        "concurrency_positive",
        "target_concurrency_range",
        "timeout_positive",
        "retries_nonnegative",
    ],
)
def test_functions_carry_scaling_checks(name: str) -> None:
    table = Base.metadata.tables["functions"]
    checks = {str(c.name) for c in table.constraints}
    assert f"ck_functions_{name}" in checks


def test_alembic_config_finds_the_migrations_without_an_ini_file() -> None:
    settings = Settings.from_env({"HOME": "/nonexistent"})
    config = migrate.alembic_config(settings)

    assert config.config_file_name is None
    assert config.attributes["settings"] is settings
    assert (migrate.migrations_dir() / "env.py").is_file()
    assert migrate.head(settings) is not None


def test_the_enums_load_without_sqlalchemy() -> None:
    code = (
        "import sys, kiln.db, kiln.db.enums\n"
        "assert 'sqlalchemy' not in sys.modules, 'kiln.db imported SQLAlchemy eagerly'\n"
        "from kiln.db.models import Function\n"
        "assert 'sqlalchemy' in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_an_installed_wheel_uses_its_packaged_migrations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site-packages" / "kiln"
    (package / "_migrations").mkdir(parents=True)
    (package / "_migrations" / "env.py").touch()
    # Someone else's top-level `migrations/` beside the package must not be picked up.
    (tmp_path / "site-packages" / "migrations").mkdir()
    (tmp_path / "site-packages" / "migrations" / "env.py").touch()
    monkeypatch.setattr(kiln, "__file__", str(package / "__init__.py"))

    assert migrate.migrations_dir() == package / "_migrations"


def test_missing_migrations_say_where_they_were_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kiln, "__file__", str(tmp_path / "kiln" / "__init__.py"))

    with pytest.raises(InternalError, match="migrations are missing: looked in") as caught:
        migrate.migrations_dir()

    assert str(tmp_path / "kiln" / "_migrations") in caught.value.message

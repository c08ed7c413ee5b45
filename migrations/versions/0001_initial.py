"""Initial schema: access, apps and functions, compute, calls, billing.

Revision ID: 0001
Revises:
Create Date: 2026-11-22 14:02:48+00:00

Generated with autogenerate, then reviewed by hand. It is frozen: it spells out every type and
constraint instead of importing the models or enums, so later model changes cannot alter what
it does. Closed sets are VARCHAR(32) plus a named CHECK constraint (what the models'
`str_enum` produces), never native enum types, so the downgrade leaves no types behind.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SCALING_SETTINGS = (
    "min_replicas",
    "max_replicas",
    "buffer_replicas",
    "idle_timeout_s",
    "concurrency",
    "target_concurrency",
    "timeout_s",
    "startup_timeout_s",
    "retries",
    "memory_mb",
)


def _choice(table: str, column: str, *values: str) -> sa.CheckConstraint:
    allowed = ", ".join(f"'{v}'" for v in values)
    return sa.CheckConstraint(f"{column} IN ({allowed})", name=op.f(f"ck_{table}_{column}"))


def _check(table: str, name: str, sql: str) -> sa.CheckConstraint:
    return sa.CheckConstraint(sql, name=op.f(f"ck_{table}_{name}"))


def _enum() -> sa.String:
    return sa.String(length=32)


def _uuid_pk() -> sa.Column[object]:
    return sa.Column("id", sa.Uuid(), nullable=False)


def _created_at() -> sa.Column[object]:
    return sa.Column(
        "created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
    )


def _updated_at() -> sa.Column[object]:
    return sa.Column(
        "updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
    )


def _int(name: str, default: int) -> sa.Column[object]:
    return sa.Column(name, sa.Integer(), server_default=sa.text(str(default)), nullable=False)


def _ts(name: str) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=True)


def _fk(
    table: str, column: str, target: str, ondelete: str | None = None
) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column],
        [f"{target}.id"],
        name=op.f(f"fk_{table}_{column}_{target}"),
        ondelete=ondelete,
    )


def _pk(table: str) -> sa.PrimaryKeyConstraint:
    return sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}"))


def _unique(table: str, *columns: str) -> sa.UniqueConstraint:
    return sa.UniqueConstraint(*columns, name=op.f(f"uq_{table}_{'_'.join(columns)}"))


def _index(table: str, *columns: str) -> None:
    op.create_index(op.f(f"ix_{table}_{'_'.join(columns)}"), table, list(columns))


def upgrade() -> None:
    _upgrade_access_and_apps()
    _upgrade_compute()
    _upgrade_calls()
    _upgrade_billing()


def _upgrade_access_and_apps() -> None:
    op.create_table(
        "customers",
        _uuid_pk(),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("tier", _enum(), server_default="free", nullable=False),
        sa.Column("status", _enum(), server_default="active", nullable=False),
        sa.Column("balance_micros", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("spend_cap_micros", sa.BigInteger(), nullable=True),
        sa.Column("refill_threshold_micros", sa.BigInteger(), nullable=True),
        sa.Column("refill_amount_micros", sa.BigInteger(), nullable=True),
        sa.Column("stripe_customer_id", sa.String(length=255), nullable=True),
        sa.Column("limit_overrides", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        _created_at(),
        _updated_at(),
        _choice("customers", "tier", "free", "pro", "enterprise"),
        _choice("customers", "status", "active", "disabled"),
        _check("customers", "spend_cap_nonnegative", "spend_cap_micros >= 0"),
        _check(
            "customers",
            "refill_complete",
            "(refill_threshold_micros IS NULL) = (refill_amount_micros IS NULL)",
        ),
        _check("customers", "refill_threshold_nonnegative", "refill_threshold_micros >= 0"),
        _check("customers", "refill_amount_positive", "refill_amount_micros > 0"),
        _pk("customers"),
        _unique("customers", "stripe_customer_id"),
    )

    # apps.current_version_id -> app_versions is added once both tables exist (a cycle).
    op.create_table(
        "apps",
        _uuid_pk(),
        sa.Column("customer_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("state", _enum(), server_default="active", nullable=False),
        sa.Column("current_version_id", sa.Uuid(), nullable=True),
        _created_at(),
        _updated_at(),
        _choice("apps", "state", "active", "stopped"),
        _fk("apps", "customer_id", "customers", "CASCADE"),
        _pk("apps"),
        _unique("apps", "customer_id", "name"),
    )

    op.create_table(
        "app_versions",
        _uuid_pk(),
        sa.Column("app_id", sa.Uuid(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("source_digest", sa.String(length=64), nullable=False),
        sa.Column("artifact_key", sa.Text(), nullable=False),
        sa.Column(
            "spec", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False
        ),
        _created_at(),
        _check("app_versions", "version_positive", "version >= 1"),
        _check("app_versions", "source_digest_sha256", "source_digest ~ '^[0-9a-f]{64}$'"),
        _fk("app_versions", "app_id", "apps", "CASCADE"),
        _pk("app_versions"),
        _unique("app_versions", "app_id", "version"),
        _unique("app_versions", "app_id", "source_digest"),
    )
    op.create_foreign_key(
        op.f("fk_apps_current_version_id_app_versions"),
        "apps",
        "app_versions",
        ["current_version_id"],
        ["id"],
        ondelete="SET NULL",
    )

    overridden_allowed = ", ".join(f"'{s}'" for s in _SCALING_SETTINGS)
    op.create_table(
        "functions",
        _uuid_pk(),
        sa.Column("app_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("kind", _enum(), server_default="function", nullable=False),
        sa.Column("current_version_id", sa.Uuid(), nullable=False),
        sa.Column("gpu", sa.String(length=32), server_default="none", nullable=False),
        _int("min_replicas", 0),
        _int("max_replicas", 4),
        _int("buffer_replicas", 0),
        _int("idle_timeout_s", 300),
        _int("concurrency", 1),
        _int("target_concurrency", 1),
        _int("timeout_s", 300),
        _int("startup_timeout_s", 600),
        _int("retries", 0),
        sa.Column("memory_mb", sa.Integer(), nullable=True),
        sa.Column(
            "overridden",
            postgresql.ARRAY(sa.String(length=32)),
            server_default="{}",
            nullable=False,
        ),
        _created_at(),
        _updated_at(),
        _choice("functions", "kind", "function", "generator", "websocket"),
        _check("functions", "min_replicas_nonnegative", "min_replicas >= 0"),
        _check("functions", "max_replicas_positive", "max_replicas >= 1"),
        _check("functions", "max_replicas_at_least_min", "max_replicas >= min_replicas"),
        _check("functions", "buffer_replicas_nonnegative", "buffer_replicas >= 0"),
        _check("functions", "idle_timeout_nonnegative", "idle_timeout_s >= 0"),
        _check("functions", "concurrency_positive", "concurrency >= 1"),
        _check(
            "functions", "target_concurrency_range", "target_concurrency BETWEEN 1 AND concurrency"
        ),
        _check("functions", "timeout_positive", "timeout_s > 0"),
        _check("functions", "startup_timeout_positive", "startup_timeout_s > 0"),
        _check("functions", "retries_nonnegative", "retries >= 0"),
        _check("functions", "memory_mb_positive", "memory_mb > 0"),
        _check(
            "functions",
            "overridden_known",
            f"overridden <@ ARRAY[{overridden_allowed}]::varchar[]",
        ),
        _fk("functions", "app_id", "apps", "CASCADE"),
        _fk("functions", "current_version_id", "app_versions"),
        _pk("functions"),
        _unique("functions", "app_id", "name"),
    )
    _index("functions", "current_version_id")

    op.create_table(
        "api_keys",
        _uuid_pk(),
        sa.Column("kind", _enum(), nullable=False),
        sa.Column("customer_id", sa.Uuid(), nullable=True),
        sa.Column("function_id", sa.Uuid(), nullable=True),
        sa.Column("key_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("prefix", sa.String(length=24), nullable=False),
        sa.Column("name", sa.String(length=100), server_default="", nullable=False),
        _ts("last_used_at"),
        _ts("expires_at"),
        _ts("revoked_at"),
        _created_at(),
        _choice("api_keys", "kind", "operator", "account", "function"),
        _check("api_keys", "key_hash_length", "octet_length(key_hash) = 32"),
        _check("api_keys", "owner_matches_kind", "(kind = 'operator') = (customer_id IS NULL)"),
        _check(
            "api_keys", "function_matches_kind", "(kind = 'function') = (function_id IS NOT NULL)"
        ),
        _fk("api_keys", "customer_id", "customers", "CASCADE"),
        _fk("api_keys", "function_id", "functions", "CASCADE"),
        _pk("api_keys"),
        _unique("api_keys", "key_hash"),
    )
    _index("api_keys", "customer_id")
    _index("api_keys", "function_id")


def _upgrade_compute() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("gpu_type", sa.String(length=32), nullable=True),
        _int("gpu_count", 0),
        _int("cpu_slots", 0),
        sa.Column("state", _enum(), server_default="ready", nullable=False),
        sa.Column(
            "labels", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False
        ),
        _ts("last_heartbeat_at"),
        _created_at(),
        _updated_at(),
        _choice("nodes", "state", "ready", "draining", "lost"),
        _check("nodes", "gpu_count_nonnegative", "gpu_count >= 0"),
        _check("nodes", "cpu_slots_nonnegative", "cpu_slots >= 0"),
        _pk("nodes"),
    )

    op.create_table(
        "replicas",
        _uuid_pk(),
        sa.Column("function_id", sa.Uuid(), nullable=False),
        sa.Column("version_id", sa.Uuid(), nullable=False),
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("state", _enum(), server_default="starting", nullable=False),
        sa.Column("gpu_type", sa.String(length=32), nullable=True),
        sa.Column(
            "gpu_indices", postgresql.ARRAY(sa.Integer()), server_default="{}", nullable=False
        ),
        _int("in_flight", 0),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        _ts("ready_at"),
        _ts("stopped_at"),
        _ts("last_heartbeat_at"),
        sa.Column("error", sa.Text(), nullable=True),
        _choice("replicas", "state", "starting", "ready", "draining", "stopped", "failed", "lost"),
        _check("replicas", "in_flight_nonnegative", "in_flight >= 0"),
        _fk("replicas", "function_id", "functions", "CASCADE"),
        _fk("replicas", "version_id", "app_versions", "CASCADE"),
        _fk("replicas", "node_id", "nodes", "CASCADE"),
        _pk("replicas"),
    )
    _index("replicas", "function_id", "state")
    _index("replicas", "node_id", "state")
    _index("replicas", "version_id")


def _upgrade_calls() -> None:
    op.create_table(
        "calls",
        _uuid_pk(),
        sa.Column("customer_id", sa.Uuid(), nullable=False),
        sa.Column("function_id", sa.Uuid(), nullable=False),
        sa.Column("version_id", sa.Uuid(), nullable=True),
        sa.Column("status", _enum(), server_default="queued", nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("request_digest", sa.String(length=64), nullable=False),
        _int("attempts", 0),
        _int("max_retries", 0),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("result", sa.LargeBinary(), nullable=True),
        sa.Column("result_content_type", sa.String(length=255), nullable=True),
        sa.Column("result_ref", sa.Text(), nullable=True),
        sa.Column("webhook_url", sa.Text(), nullable=True),
        _ts("started_at"),
        _ts("finished_at"),
        _ts("expires_at"),
        _created_at(),
        _updated_at(),
        _choice(
            "calls", "status", "queued", "running", "succeeded", "failed", "cancelled", "expired"
        ),
        _check("calls", "attempts_nonnegative", "attempts >= 0"),
        _check("calls", "max_retries_nonnegative", "max_retries >= 0"),
        _check("calls", "result_in_one_place", "result IS NULL OR result_ref IS NULL"),
        _fk("calls", "customer_id", "customers", "CASCADE"),
        _fk("calls", "function_id", "functions", "CASCADE"),
        _fk("calls", "version_id", "app_versions", "SET NULL"),
        _pk("calls"),
        _unique("calls", "customer_id", "idempotency_key"),
    )
    _index("calls", "customer_id", "status")
    _index("calls", "function_id", "status")
    _index("calls", "status", "expires_at")
    _index("calls", "version_id")

    op.create_table(
        "invocations",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("customer_id", sa.Uuid(), nullable=False),
        sa.Column("function_id", sa.Uuid(), nullable=False),
        sa.Column("version_id", sa.Uuid(), nullable=True),
        sa.Column("replica_id", sa.Uuid(), nullable=True),
        sa.Column("call_id", sa.Uuid(), nullable=True),
        sa.Column("kind", _enum(), nullable=False),
        sa.Column("status", _enum(), nullable=False),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("queue_wait_ms", sa.Integer(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("bytes_in", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("bytes_out", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("cold_start", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        _choice("invocations", "kind", "sync", "stream", "websocket", "job"),
        _choice("invocations", "status", "succeeded", "failed", "cancelled"),
        _pk("invocations"),
    )
    _index("invocations", "function_id", "started_at")
    _index("invocations", "customer_id", "started_at")


def _upgrade_billing() -> None:
    op.create_table(
        "usage_events",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("replica_id", sa.Uuid(), nullable=False),
        sa.Column("customer_id", sa.Uuid(), nullable=False),
        sa.Column("function_id", sa.Uuid(), nullable=False),
        sa.Column("gpu_type", sa.String(length=32), nullable=True),
        sa.Column("gpu_count", sa.Integer(), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column(
            "received_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        _check("usage_events", "period_ordered", "period_end >= period_start"),
        _check("usage_events", "duration_nonnegative", "duration_ms >= 0"),
        _check("usage_events", "gpu_count_nonnegative", "gpu_count >= 0"),
        _fk("usage_events", "customer_id", "customers", "RESTRICT"),
        _pk("usage_events"),
    )
    _index("usage_events", "replica_id")
    _index("usage_events", "customer_id", "period_start")
    _index("usage_events", "function_id", "period_start")

    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("customer_id", sa.Uuid(), nullable=False),
        sa.Column("kind", _enum(), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("balance_after_micros", sa.BigInteger(), nullable=True),
        sa.Column("usage_event_id", sa.String(length=128), nullable=True),
        sa.Column("external_id", sa.String(length=255), nullable=True),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        _created_at(),
        _choice("ledger_entries", "kind", "usage", "topup", "refund", "adjustment", "refill"),
        _check(
            "ledger_entries", "usage_has_event", "(kind = 'usage') = (usage_event_id IS NOT NULL)"
        ),
        _check("ledger_entries", "usage_is_debit", "kind <> 'usage' OR amount_micros <= 0"),
        _check(
            "ledger_entries",
            "topup_is_credit",
            "kind NOT IN ('topup', 'refill') OR amount_micros > 0",
        ),
        _fk("ledger_entries", "customer_id", "customers", "RESTRICT"),
        _fk("ledger_entries", "usage_event_id", "usage_events", "RESTRICT"),
        _pk("ledger_entries"),
        _unique("ledger_entries", "usage_event_id"),
        _unique("ledger_entries", "external_id"),
    )
    _index("ledger_entries", "customer_id", "created_at")


def downgrade() -> None:
    # Children before parents. Indexes, constraints and identity sequences go with their table;
    # only the apps <-> app_versions cycle needs breaking first.
    for table in ("ledger_entries", "usage_events", "invocations", "calls", "replicas", "nodes"):
        op.drop_table(table)
    op.drop_table("api_keys")
    op.drop_table("functions")
    op.drop_constraint(op.f("fk_apps_current_version_id_app_versions"), "apps", type_="foreignkey")
    for table in ("app_versions", "apps", "customers"):
        op.drop_table(table)

"""What customers deploy: apps, their immutable versions, and the functions they expose."""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Mapped, mapped_column, relationship

from kiln.db.base import Base, CreatedAt, Timestamps, int_default, str_enum, uuid_pk
from kiln.db.enums import AppState, FunctionKind, ScalingSetting

__all__ = ["App", "AppVersion", "Function"]

# Relationships use lazy="raise": an async session cannot lazy-load, and an explicit error at the
# attribute beats a MissingGreenlet deep inside SQLAlchemy. Load with selectinload() instead.


class App(Timestamps, Base):
    __tablename__ = "apps"

    id: Mapped[uuid.UUID] = uuid_pk()
    customer_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("customers.id", ondelete="CASCADE")
    )
    name: Mapped[str] = mapped_column(sa.String(63))
    state: Mapped[AppState] = mapped_column(
        str_enum(AppState, "state"), default=AppState.ACTIVE, server_default="active"
    )
    # apps and app_versions point at each other; use_alter adds this key after both tables exist.
    current_version_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("app_versions.id", ondelete="SET NULL", use_alter=True)
    )

    versions: Mapped[list[AppVersion]] = relationship(
        back_populates="app",
        foreign_keys="AppVersion.app_id",
        lazy="raise",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )
    # post_update: the version row must exist before the app can point at it, so this column
    # is written in a second UPDATE after both INSERTs.
    current_version: Mapped[AppVersion | None] = relationship(
        foreign_keys=[current_version_id], post_update=True, lazy="raise"
    )
    functions: Mapped[list[Function]] = relationship(
        back_populates="app", lazy="raise", cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (sa.UniqueConstraint("customer_id", "name"),)


class AppVersion(CreatedAt, Base):
    """One deployed source tree. Immutable once written."""

    __tablename__ = "app_versions"

    id: Mapped[uuid.UUID] = uuid_pk()
    app_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("apps.id", ondelete="CASCADE"))
    version: Mapped[int]
    # sha256 of the packaged source: deploying the same tree twice yields the same version.
    source_digest: Mapped[str] = mapped_column(sa.String(64))
    artifact_key: Mapped[str] = mapped_column(sa.Text)
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")

    app: Mapped[App] = relationship(back_populates="versions", foreign_keys=[app_id], lazy="raise")

    __table_args__ = (
        sa.UniqueConstraint("app_id", "version"),
        sa.UniqueConstraint("app_id", "source_digest"),
        sa.CheckConstraint("version >= 1", name="version_positive"),
        sa.CheckConstraint("source_digest ~ '^[0-9a-f]{64}$'", name="source_digest_sha256"),
    )


_SCALING_NAMES = ", ".join(f"'{s.value}'" for s in ScalingSetting)


class Function(Timestamps, Base):
    """A callable endpoint of an app; a class method is named "Class.method"."""

    __tablename__ = "functions"

    id: Mapped[uuid.UUID] = uuid_pk()
    app_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("apps.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(sa.String(128))
    kind: Mapped[FunctionKind] = mapped_column(
        str_enum(FunctionKind, "kind"), default=FunctionKind.FUNCTION, server_default="function"
    )
    # No ondelete: a version that a function still serves cannot be removed on its own (the
    # check runs at the end of the statement, so deleting the whole app still cascades).
    current_version_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("app_versions.id"), index=True
    )
    # "none" (CPU), "any", or a type with an optional count such as "H100:2".
    gpu: Mapped[str] = mapped_column(sa.String(32), default="none", server_default="none")

    min_replicas: Mapped[int] = int_default(0)
    max_replicas: Mapped[int] = int_default(4)
    buffer_replicas: Mapped[int] = int_default(0)
    idle_timeout_s: Mapped[int] = int_default(300)
    concurrency: Mapped[int] = int_default(1)
    target_concurrency: Mapped[int] = int_default(1)
    timeout_s: Mapped[int] = int_default(300)
    startup_timeout_s: Mapped[int] = int_default(600)
    retries: Mapped[int] = int_default(0)
    memory_mb: Mapped[int | None]
    # Increases whenever current_version_id changes (rollbacks too); calls carry it and older
    # replicas hand such calls back (kiln.wire, the generation field of H.CALL).
    generation: Mapped[int] = int_default(1)
    # The scaling settings an operator changed live: a redeploy keeps these and applies the
    # new version's values only to the rest.
    overridden: Mapped[list[str]] = mapped_column(
        postgresql.ARRAY(sa.String(32)), default=list, server_default="{}"
    )

    app: Mapped[App] = relationship(back_populates="functions", lazy="raise")
    current_version: Mapped[AppVersion] = relationship(lazy="raise")

    __table_args__ = (
        sa.UniqueConstraint("app_id", "name"),
        sa.CheckConstraint("min_replicas >= 0", name="min_replicas_nonnegative"),
        sa.CheckConstraint("max_replicas >= 1", name="max_replicas_positive"),
        sa.CheckConstraint("max_replicas >= min_replicas", name="max_replicas_at_least_min"),
        sa.CheckConstraint("buffer_replicas >= 0", name="buffer_replicas_nonnegative"),
        sa.CheckConstraint("idle_timeout_s >= 0", name="idle_timeout_nonnegative"),
        sa.CheckConstraint("concurrency >= 1", name="concurrency_positive"),
        sa.CheckConstraint(
            "target_concurrency BETWEEN 1 AND concurrency", name="target_concurrency_range"
        ),
        sa.CheckConstraint("timeout_s > 0", name="timeout_positive"),
        sa.CheckConstraint("startup_timeout_s > 0", name="startup_timeout_positive"),
        sa.CheckConstraint("retries >= 0", name="retries_nonnegative"),
        sa.CheckConstraint("memory_mb > 0", name="memory_mb_positive"),
        sa.CheckConstraint("generation >= 1", name="generation_positive"),
        sa.CheckConstraint(
            f"overridden <@ ARRAY[{_SCALING_NAMES}]::varchar[]", name="overridden_known"
        ),
    )

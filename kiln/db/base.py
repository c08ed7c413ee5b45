"""The declarative base every Kiln table derives from, and the column helpers they share.

Constraint names follow one convention so that Alembic emits the same names on every database
and a later migration can drop or alter a constraint by name.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "NAMING_CONVENTION",
    "Base",
    "CreatedAt",
    "Timestamps",
    "int_default",
    "str_enum",
    "uuid_pk",
]

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Room for values added later: growing a closed set then only replaces a CHECK constraint.
_ENUM_LENGTH = 32


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    # Server-generated values (timestamps, identities) come back with the INSERT or UPDATE, so
    # reading them later never triggers a lazy load, which an async session cannot do.
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute as is
        # Naive datetimes are ambiguous across hosts; every timestamp is stored with its zone.
        datetime: sa.DateTime(timezone=True),
        dict[str, Any]: postgresql.JSONB(),
    }


def str_enum(kind: type[enum.StrEnum], name: str) -> sa.Enum:
    """A closed set stored as short text plus a CHECK constraint named `name`.

    Native PostgreSQL enums cannot lose a value and need a type created and dropped beside the
    table, which makes downgrades painful; a CHECK constraint is replaced in one statement.
    """
    return sa.Enum(
        kind,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=_ENUM_LENGTH,
        values_callable=_enum_values,
        validate_strings=True,
    )


def _enum_values(kind: type[enum.Enum]) -> list[str]:
    return [str(member.value) for member in kind]


def uuid_pk() -> Mapped[uuid.UUID]:
    # Generated in Python so a row's id is known before the INSERT (for NATS messages, logs).
    return mapped_column(sa.Uuid(), primary_key=True, default=uuid.uuid4)


def int_default(default: int) -> Mapped[int]:
    # The ORM sends `default`; `server_default` serves rows written in plain SQL (batch writers,
    # psql, tests). Both come from one number so they cannot disagree.
    return mapped_column(default=default, server_default=sa.text(str(default)))


# Timestamps sort after each table's own columns, in the same order in every table.
class CreatedAt:
    created_at: Mapped[datetime] = mapped_column(server_default=sa.func.now(), sort_order=100)


class Timestamps(CreatedAt):
    updated_at: Mapped[datetime] = mapped_column(
        server_default=sa.func.now(), onupdate=sa.func.now(), sort_order=101
    )

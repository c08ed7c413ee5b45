"""Pods and shells: replicas a customer reserves (`/v1/pods`), outside the autoscaler.

A row is what the customer asked for; the scheduler gives each active one a replica of its
function, started with `replica_id` (chosen before the start, so a router can address the
replica's terminal without waiting for the scheduler), and never scales it down or drains it
for room. A shell ends with its first terminal; a pod runs until it is stopped.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Mapped, mapped_column

from kiln.db.base import Base, Timestamps, int_default, str_enum, uuid_pk
from kiln.db.enums import PodKind, PodState

__all__ = ["Pod", "StorageCharge"]


class Pod(Timestamps, Base):
    __tablename__ = "pods"

    id: Mapped[uuid.UUID] = uuid_pk()
    customer_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("customers.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(sa.String(64))
    kind: Mapped[PodKind] = mapped_column(str_enum(PodKind, "kind"))
    # What it runs: the code, environment, secrets and GPU request of this function. An app
    # is not deleted while pods that have not ended use it; an ended pod's row outlives its
    # app (its storage charges name it), with no function.
    function_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("functions.id", ondelete="SET NULL"), index=True
    )
    gpu: Mapped[str | None] = mapped_column(sa.String(32))  # its own request; None: its function's
    state: Mapped[PodState] = mapped_column(
        str_enum(PodState, "state"), default=PodState.STARTING, server_default="starting"
    )
    # Its current (or last) replica; a new one for every start.
    replica_id: Mapped[uuid.UUID] = mapped_column(default=uuid.uuid4)
    node_id: Mapped[str | None] = mapped_column(sa.String(128))
    # The node its volume lives on (since its first start), until the pod ends and it goes.
    volume_node_id: Mapped[str | None] = mapped_column(sa.String(128))
    ports: Mapped[list[int]] = mapped_column(
        postgresql.ARRAY(sa.Integer), default=list, server_default="{}"
    )
    volume_gb: Mapped[int] = int_default(0)
    started_at: Mapped[datetime | None]  # when its replica became ready
    stopped_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(sa.Text)  # why it ended or stopped, if not asked
    # Stopped after this long with no terminal or port traffic (None: never).
    auto_stop_s: Mapped[int | None]
    active_at: Mapped[datetime | None]  # its last terminal or port traffic, as its replica said
    reminded_at: Mapped[datetime | None]  # the owners were told it sits idle (once an idle spell)
    # Its volume's storage is charged up to here (None: from its creation).
    storage_charged_until: Mapped[datetime | None]
    image: Mapped[str | None] = mapped_column(sa.String(512))  # a container image to run
    # Python requirements installed for it (by the node, into an environment it keeps).
    requirements: Mapped[list[str]] = mapped_column(
        postgresql.ARRAY(sa.Text), default=list, server_default="{}"
    )
    # Where its volume is parked in the store (moved off its node while stopped), else None.
    volume_key: Mapped[str | None] = mapped_column(sa.Text)
    failures: Mapped[int] = int_default(0)  # its replicas' failed starts in a row

    __table_args__ = (
        sa.Index(None, "state"),
        sa.Index(
            "ix_pods_customer_name_live",
            "customer_id",
            "name",
            unique=True,
            postgresql_where=sa.text("state <> 'ended'"),
        ),
        sa.CheckConstraint("volume_gb >= 0", name="volume_gb_nonnegative"),
        sa.CheckConstraint("auto_stop_s IS NULL OR auto_stop_s > 0", name="auto_stop_positive"),
    )


class StorageCharge(Base):
    """What a `storage` ledger entry charged for: a pod's volume of `gb` over a period, so
    that invoices show GB-hours per pod."""

    __tablename__ = "storage_charges"

    ledger_entry_id: Mapped[int] = mapped_column(
        sa.BigInteger, sa.ForeignKey("ledger_entries.id", ondelete="RESTRICT"), primary_key=True
    )
    pod_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("pods.id", ondelete="RESTRICT"), index=True
    )
    gb: Mapped[int]
    period_start: Mapped[datetime]
    period_end: Mapped[datetime]

    __table_args__ = (sa.CheckConstraint("period_end > period_start", name="forward"),)

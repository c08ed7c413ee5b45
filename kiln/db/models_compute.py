"""Where code runs: GPU hosts and the replicas placed on them."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Mapped, mapped_column

from kiln.db.base import Base, Timestamps, int_default, str_enum, uuid_pk
from kiln.db.enums import NodeState, ReplicaState

__all__ = ["Node", "Replica"]


class Node(Timestamps, Base):
    """A host running a node agent. NULL `gpu_type` means a CPU-only host."""

    __tablename__ = "nodes"

    # Chosen by the node agent (stable across its restarts), not by the database.
    id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(sa.String(255))
    gpu_type: Mapped[str | None] = mapped_column(sa.String(32))
    gpu_count: Mapped[int] = int_default(0)
    cpu_slots: Mapped[int] = int_default(0)
    state: Mapped[NodeState] = mapped_column(
        str_enum(NodeState, "state"), default=NodeState.READY, server_default="ready"
    )
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    last_heartbeat_at: Mapped[datetime | None]

    __table_args__ = (
        sa.CheckConstraint("gpu_count >= 0", name="gpu_count_nonnegative"),
        sa.CheckConstraint("cpu_slots >= 0", name="cpu_slots_nonnegative"),
    )


class Replica(Base):
    """One invoker process bound to a function version and its GPUs on a node."""

    __tablename__ = "replicas"

    id: Mapped[uuid.UUID] = uuid_pk()
    # Replica rows are operational state: they go with their function, version or node. Billing
    # history keeps the replica id without a foreign key (see UsageEvent).
    function_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("functions.id", ondelete="CASCADE")
    )
    version_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("app_versions.id", ondelete="CASCADE"), index=True
    )
    node_id: Mapped[str] = mapped_column(sa.ForeignKey("nodes.id", ondelete="CASCADE"))
    state: Mapped[ReplicaState] = mapped_column(
        str_enum(ReplicaState, "state"), default=ReplicaState.STARTING, server_default="starting"
    )
    gpu_type: Mapped[str | None] = mapped_column(sa.String(32))
    gpu_indices: Mapped[list[int]] = mapped_column(
        postgresql.ARRAY(sa.Integer), default=list, server_default="{}"
    )
    in_flight: Mapped[int] = int_default(0)
    started_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    ready_at: Mapped[datetime | None]
    stopped_at: Mapped[datetime | None]
    last_heartbeat_at: Mapped[datetime | None]
    idle_since: Mapped[datetime | None]  # nothing in flight since then; NULL while busy
    error: Mapped[str | None] = mapped_column(sa.Text)
    # How its instance was built (kiln.wire.Origin): snapshot, baked, hooks or fallback.
    origin: Mapped[str | None] = mapped_column(sa.String(16))

    __table_args__ = (
        sa.Index(None, "function_id", "state"),
        sa.Index(None, "node_id", "state"),
        sa.CheckConstraint("in_flight >= 0", name="in_flight_nonnegative"),
    )

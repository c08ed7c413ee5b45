"""Calls: async jobs with their results, and the log of every invocation."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Mapped, mapped_column

from kiln.db.base import Base, Timestamps, int_default, str_enum, uuid_pk
from kiln.db.enums import CallStatus, InvocationKind, InvocationStatus, WebhookState

__all__ = ["Call", "Invocation"]


class Call(Timestamps, Base):
    """An async job (`POST /v1/spawn`), kept until `expires_at` so its result can be fetched."""

    __tablename__ = "calls"

    id: Mapped[uuid.UUID] = uuid_pk()
    customer_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("customers.id", ondelete="CASCADE")
    )
    function_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("functions.id", ondelete="CASCADE")
    )
    version_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("app_versions.id", ondelete="SET NULL"), index=True
    )
    status: Mapped[CallStatus] = mapped_column(
        str_enum(CallStatus, "status"), default=CallStatus.QUEUED, server_default="queued"
    )
    # A repeated Idempotency-Key returns the first call; the digest tells a true repeat from the
    # same key reused for a different request.
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(255))
    request_digest: Mapped[str] = mapped_column(sa.String(64))
    attempts: Mapped[int] = int_default(0)
    max_retries: Mapped[int] = int_default(0)
    error_code: Mapped[str | None] = mapped_column(sa.String(64))
    error_message: Mapped[str | None] = mapped_column(sa.Text)
    # A small result is stored inline; a large one lives in the object store under `result_ref`.
    result: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
    result_content_type: Mapped[str | None] = mapped_column(sa.String(255))
    result_ref: Mapped[str | None] = mapped_column(sa.Text)
    # The entry point of a class (`Class.method`); None for a plain function.
    method: Mapped[str | None] = mapped_column(sa.String(63))
    # The replica running it now (cancel tells it); its body in the payload store, if large.
    replica_id: Mapped[uuid.UUID | None]
    body_ref: Mapped[str | None] = mapped_column(sa.Text)
    bytes_in: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default=sa.text("0"))
    webhook_url: Mapped[str | None] = mapped_column(sa.Text)
    # The completion webhook: pending until delivered (or failed after its retries).
    webhook_state: Mapped[WebhookState | None] = mapped_column(
        str_enum(WebhookState, "webhook_state")
    )
    webhook_attempts: Mapped[int] = int_default(0)
    webhook_next_at: Mapped[datetime | None]
    webhook_error: Mapped[str | None] = mapped_column(sa.Text)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]

    __table_args__ = (
        sa.UniqueConstraint("customer_id", "idempotency_key"),
        sa.Index(None, "customer_id", "status"),
        sa.Index(None, "function_id", "status"),
        # The sweeper that expires old calls scans by these.
        sa.Index(None, "status", "expires_at"),
        # The webhook sender looks for due deliveries.
        sa.Index(None, "webhook_state", "webhook_next_at"),
        sa.CheckConstraint("attempts >= 0", name="attempts_nonnegative"),
        sa.CheckConstraint("max_retries >= 0", name="max_retries_nonnegative"),
        sa.CheckConstraint("result IS NULL OR result_ref IS NULL", name="result_in_one_place"),
    )


class Invocation(Base):
    """One row per request served, written in batches by the invocation log writer.

    The ids carry no foreign keys on purpose: one row naming a function deleted meanwhile must
    not fail a whole batch, the log must outlive the rows it names, and an append-heavy table
    should not lock its parents on every insert.
    """

    __tablename__ = "invocations"

    id: Mapped[int] = mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    customer_id: Mapped[uuid.UUID]
    function_id: Mapped[uuid.UUID]
    version_id: Mapped[uuid.UUID | None]
    replica_id: Mapped[uuid.UUID | None]
    # A sync, stream or session call: `<router>-<call>`; a job attempt: `<job id>:<attempt>`.
    call_id: Mapped[str | None] = mapped_column(sa.String(64))
    request_id: Mapped[str | None] = mapped_column(sa.String(128))  # a caller's X-Request-Id
    method: Mapped[str | None] = mapped_column(sa.String(63))
    kind: Mapped[InvocationKind] = mapped_column(str_enum(InvocationKind, "kind"))
    status: Mapped[InvocationStatus] = mapped_column(str_enum(InvocationStatus, "status"))
    error_code: Mapped[str | None] = mapped_column(sa.String(64))
    started_at: Mapped[datetime]
    queue_wait_ms: Mapped[int | None]
    duration_ms: Mapped[int | None]
    # From a replica taking the call to its answer (for a stream, its last chunk).
    execution_ms: Mapped[int | None]
    bytes_in: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default=sa.text("0"))
    bytes_out: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default=sa.text("0"))
    cold_start: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    # Calls through the OpenAI-compatible routes: the tokens read and written (analytics only).
    prompt_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    # Real-time voice sessions: each answer's timings (`kiln.catalog.realtime.response.Turn`).
    voice_turns: Mapped[list[dict[str, Any]] | None] = mapped_column(postgresql.JSONB)

    __table_args__ = (
        sa.Index(None, "function_id", "started_at"),
        sa.Index(None, "customer_id", "started_at"),
        sa.Index(None, "started_at"),  # the retention sweep
        # One row per job attempt, however often the recorder sees the attempt's end.
        sa.Index(
            "ix_invocations_job_attempt",
            "call_id",
            unique=True,
            postgresql_where=sa.text("kind = 'job'"),
        ),
    )

"""The tables. Statuses and cancel outcomes are plain strings checked here and in ``status``.

Times are stored as naive UTC (SQLite has no time zones) and come back aware.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from comfy_cancel import encryption
from comfy_cancel.config import secret_keys


class WorkflowStatus(StrEnum):
    ACCEPTED = "accepted"
    UPLOADED = "uploaded"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({WorkflowStatus.COMPLETED, WorkflowStatus.FAILED, WorkflowStatus.CANCELLED})
CANCELLABLE = frozenset({WorkflowStatus.QUEUED, WorkflowStatus.RUNNING})


class CancelSource(StrEnum):
    API = "api"
    BULK = "bulk"
    SWEEP = "sweep"
    RUNNER_INTERRUPT = "runner_interrupt"  # POST /v1/runner/{id}/interrupt
    DEADLINE = "deadline"  # the workflow's own timeout_seconds ran out


class CancelOutcome(StrEnum):
    CANCELLED = "cancelled"  # the workflow was stopped by this request
    TOO_LATE = "too_late"  # it completed or failed first
    ALREADY_CANCELLED = "already_cancelled"  # something else cancelled it first
    FORCED = "forced"  # the runner did not acknowledge in the grace period
    RUNNER_LOST = "runner_lost"  # the runner's heartbeat was gone


class RunnerStatus(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso_utc(value: datetime) -> str:
    """ISO 8601 in UTC with a ``Z``, the one time format of the API."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC, on every backend alike."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiToken(Base):
    """Only the SHA-256 of a token is kept; the token itself is shown once."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    display_prefix: Mapped[str] = mapped_column(String(16))
    is_operator: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Requests per rate-limit window; None means the configured default.
    rate_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Runner(Base):
    __tablename__ = "runners"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    endpoint_url: Mapped[str] = mapped_column(String(2000))
    # Header values are credentials: stored only sealed (comfy_cancel.encryption); the
    # names stay readable so that listing a runner needs no key.
    sealed_headers: Mapped[str | None] = mapped_column(Text, nullable=True)
    header_names: Mapped[list[str]] = mapped_column(JSON, default=list)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(16), default=RunnerStatus.ACTIVE)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index("ix_runners_account_status", "account_id", "status"),)

    @property
    def headers(self) -> dict[str, str]:
        """The extra headers in clear. Raises :class:`~comfy_cancel.encryption.SecretKeyError`
        when they cannot be decrypted with the configured key."""
        if not self.sealed_headers:
            return {}
        return encryption.unseal(self.sealed_headers, secret_keys())

    @headers.setter
    def headers(self, value: Mapping[str, str] | None) -> None:
        self.set_headers(value)

    def set_headers(self, value: Mapping[str, str] | None, keys: str | None = None) -> None:
        """Seal ``value`` with ``keys`` (default: the settings' secret key); raises
        SecretKeyMissing when there are headers and no key."""
        headers = dict(value or {})
        if keys is None:
            keys = secret_keys()
        self.sealed_headers = encryption.seal(headers, keys) if headers else None
        self.header_names = list(headers)


class Workflow(Base):
    __tablename__ = "workflows"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=WorkflowStatus.ACCEPTED)
    runner_id: Mapped[str | None] = mapped_column(
        ForeignKey("runners.id", ondelete="SET NULL"), nullable=True
    )
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    workflow_json: Mapped[dict[str, Any]] = mapped_column(JSON)
    prompt_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    queue_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    outputs: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error_node: Mapped[str | None] = mapped_column(String(64), nullable=True)
    exception_type: Mapped[str | None] = mapped_column(String(200), nullable=True)
    exception_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    runner_task_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # New runner tasks the orphan sweep gave it (a lost task); bounded by max_redispatches.
    redispatch_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    # The cancel request rides beside the status instead of being a status of its own.
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    cancel_source: Mapped[str | None] = mapped_column(String(16), nullable=True)
    cancel_actor: Mapped[str | None] = mapped_column(String(200), nullable=True)
    cancel_reason: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    cancel_published_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # When a cancel worker took the request (re-publish hands on only what nobody took).
    cancel_taken_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    cancel_outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)
    cancel_finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The customer's optional time limit from submission, and the instant it runs out.
    timeout_seconds: Mapped[int | None] = mapped_column(Integer, nullable=True)
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # What ComfyUI reported saved before a cancel stopped the prompt (``outputs`` stays
    # for completed work only).
    partial_outputs: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # When the runner confirmed ComfyUI holds the cancelled prompt no more (GPU freed).
    freed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    def cancel_timing(self) -> dict[str, Any]:
        """Seconds from the cancel request to now, for the audit row of its outcome."""
        if self.cancel_requested_at is None:
            return {}
        seconds = (utcnow() - self.cancel_requested_at).total_seconds()
        return {"seconds_since_request": round(seconds, 4)}

    __table_args__ = (
        Index("ix_workflows_account_created", "account_id", "created_at"),
        Index("ix_workflows_account_status_created", "account_id", "status", "created_at"),
        Index("ix_workflows_status_created", "status", "created_at"),
        Index("ix_workflows_status_updated", "status", "updated_at"),
        Index("ix_workflows_status_heartbeat", "status", "heartbeat_at"),
        Index("ix_workflows_status_started", "status", "started_at"),
        Index("ix_workflows_runner_status", "runner_id", "status"),
        # Only open cancel intents are indexed, so the re-publish sweep costs what it finds.
        Index(
            "ix_workflows_open_cancel",
            "cancel_requested_at",
            postgresql_where=text("cancel_requested_at IS NOT NULL AND cancel_outcome IS NULL"),
            sqlite_where=text("cancel_requested_at IS NOT NULL AND cancel_outcome IS NULL"),
        ),
        Index(
            "ix_workflows_open_deadline",
            "deadline_at",
            postgresql_where=text("deadline_at IS NOT NULL AND cancel_requested_at IS NULL"),
            sqlite_where=text("deadline_at IS NOT NULL AND cancel_requested_at IS NULL"),
        ),
    )


class WorkflowTag(Base):
    """One row per tag of a workflow, so bulk cancels can filter by tag through an index."""

    __tablename__ = "workflow_tags"

    workflow_id: Mapped[str] = mapped_column(
        ForeignKey("workflows.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(100), primary_key=True)

    __table_args__ = (Index("ix_workflow_tags_tag", "tag", "workflow_id"),)


class EventKind(StrEnum):
    TRANSITION = "transition"
    CANCEL_REQUESTED = "cancel_requested"
    CANCEL_SIGNALLED = "cancel_signalled"  # a cancel worker signalled the runner
    CANCEL_ACKNOWLEDGED = "cancel_acknowledged"  # the runner saw ComfyUI stop the prompt
    CANCEL_OUTCOME = "cancel_outcome"
    # ComfyUI was seen holding a cancelled prompt no more (workflows.freed_at).
    GPU_FREED = "gpu_freed"


class WorkflowEvent(Base):
    """The audit trail: every transition, every cancel request and every cancel outcome."""

    __tablename__ = "workflow_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    workflow_id: Mapped[str] = mapped_column(ForeignKey("workflows.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    from_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    source: Mapped[str | None] = mapped_column(String(16), nullable=True)
    actor: Mapped[str | None] = mapped_column(String(200), nullable=True)
    reason: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # Timing and other facts of the event, e.g. seconds from the cancel request to its outcome.
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    __table_args__ = (Index("ix_workflow_events_workflow", "workflow_id", "id"),)

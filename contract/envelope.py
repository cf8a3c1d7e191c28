"""The envelope every event travels in (on the wire and in the events table), and the
vocabulary its snapshots use."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from uuid import UUID, uuid4

from pydantic import BaseModel, ConfigDict, Field, field_validator


class AggregateType(StrEnum):
    WORKFLOW = "workflow"
    DEFINITION = "definition"
    USER = "user"


class WorkflowStatus(StrEnum):
    DRAFT = "draft"
    IN_PROGRESS = "in_progress"
    CHANGES_REQUESTED = "changes_requested"
    APPROVED = "approved"
    REJECTED = "rejected"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset(
    {WorkflowStatus.APPROVED, WorkflowStatus.REJECTED, WorkflowStatus.CANCELLED})


class StepStatus(StrEnum):
    WAITING = "waiting"
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    CHANGES_REQUESTED = "changes_requested"
    DELEGATED = "delegated"
    SKIPPED = "skipped"


class Priority(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    URGENT = "urgent"


class Decision(StrEnum):
    APPROVED = "approved"
    REJECTED = "rejected"
    CHANGES_REQUESTED = "changes_requested"
    DELEGATED = "delegated"


class EventMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant_id: UUID
    user_id: UUID | None = None  # the actor; None for system-initiated events
    correlation_id: UUID
    causation_id: UUID | None = None
    trace_id: str | None = None  # W3C trace id, 32 lowercase hex digits
    is_reconstructed: bool = False


class EventEnvelope(BaseModel):
    """What travels on the wire, and what the events table stores. `payload` has the
    shape of the event type's model in `contract.events`; `aggregate` is the
    aggregate's state after the event, shaped as its snapshot in `contract.snapshots`.
    Both stay plain dicts at runtime (no second validation on every decode); the
    published JSON Schemas and the tests hold them to their models."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: UUID = Field(default_factory=uuid4)
    event_type: str = Field(min_length=1, max_length=100)
    schema_version: int = Field(default=1, ge=1)
    aggregate_type: AggregateType
    aggregate_id: UUID
    version: int = Field(ge=1)
    occurred_at: datetime
    payload: dict[str, Any]
    aggregate: dict[str, Any]
    metadata: EventMetadata

    @field_validator("occurred_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("occurred_at must be timezone-aware (UTC)")
        return value.astimezone(UTC)

    @property
    def tenant_id(self) -> UUID:
        return self.metadata.tenant_id


def utcnow() -> datetime:
    return datetime.now(UTC)

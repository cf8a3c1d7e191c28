"""The aggregates' state after each event, as every event carries it (`aggregate`).

Typed dicts: the shape the domain writes and every reader (projectors, operations,
the query API) reads, checked by a type checker, with no validation cost on the hot
path; `contract.schemas` publishes them as JSON Schema, and the tests validate every
event of a realistic history against it. Times are ISO 8601 strings in UTC, ids are
UUID strings; an enum-typed field holds the enum's string value."""

from __future__ import annotations

from typing import NotRequired, cast

from typing_extensions import TypedDict  # pydantic reads TypedDicts from here (< 3.12)

from contract.envelope import Decision, EventEnvelope, Priority, StepStatus, WorkflowStatus


class UserSnapshot(TypedDict):
    id: str
    version: int
    display_name: str
    email: str
    registered_at: str | None
    updated_at: str | None
    # How the user is notified (NotificationPreferencesSet); absent in snapshots written
    # before preferences existed: read them with their defaults.
    locale: NotRequired[str]  # "ja" (default) or "en"
    channels: NotRequired[list[str]]  # of "email" (default), "chat"
    chat_webhook_url: NotRequired[str | None]


class StepTemplateSnapshot(TypedDict):
    """A definition step: who decides it, in `order` (from 1)."""

    order: int
    name: str
    assignee_id: str


class DefinitionSnapshot(TypedDict):
    id: str
    version: int
    name: str
    description: str | None
    steps: list[StepTemplateSnapshot]
    created_by_id: str | None
    created_by_name: str
    created_at: str | None


class StepSnapshot(TypedDict):
    step_id: str
    name: str
    order: int
    assignee_id: str
    assignee_name: str
    status: StepStatus
    assigned_at: str | None
    decision: Decision | None
    decided_at: str | None
    comment: str | None
    delegated_from: list[str]  # who handed the step on, oldest first


class CommentSnapshot(TypedDict):
    comment_id: str
    author_id: str
    author_name: str
    body: str
    created_at: str


class DocumentFields(TypedDict):
    """Metadata of an attached file (the bytes live elsewhere)."""

    document_id: str
    filename: str
    content_type: str
    size_bytes: int
    sha256: str | None
    url: str | None  # a stable location, never a pre-signed link: events are kept forever


class DocumentSnapshot(DocumentFields):
    attached_by_id: str
    attached_by_name: str
    attached_at: str


class WorkflowSnapshot(TypedDict):
    id: str
    version: int
    status: WorkflowStatus | None
    definition_id: str | None
    definition_name: str
    title: str
    description: str | None
    priority: Priority
    due_date: str | None
    initiator_id: str | None
    initiator_name: str
    current_step_id: str | None
    current_step_name: str | None
    current_assignee_id: str | None
    current_assignee_name: str | None
    steps: list[StepSnapshot]
    comments: list[CommentSnapshot]
    documents: list[DocumentSnapshot]
    created_at: str | None
    updated_at: str | None
    submitted_at: str | None
    completed_at: str | None  # approved or rejected
    cancelled_at: str | None
    cancel_reason: str | None
    # Set by the completion saga (absent before it ran): the finalized document manifest,
    # and how completion ended.
    documents_finalized: NotRequired[bool]
    manifest_sha256: NotRequired[str | None]
    completion: NotRequired[str | None]  # "completed" | "completion_failed"
    completion_error: NotRequired[str | None]


Snapshot = UserSnapshot | DefinitionSnapshot | WorkflowSnapshot


def workflow_of(envelope: EventEnvelope) -> WorkflowSnapshot:
    """A workflow event's snapshot, typed (no copy, no validation)."""
    return cast(WorkflowSnapshot, envelope.aggregate)


def user_of(envelope: EventEnvelope) -> UserSnapshot:
    return cast(UserSnapshot, envelope.aggregate)


def definition_of(envelope: EventEnvelope) -> DefinitionSnapshot:
    return cast(DefinitionSnapshot, envelope.aggregate)

"""Every event type: its name, the aggregate it belongs to, and its payload's shape.

The names are an enum, so no module spells an event type as a string literal; the
payloads are typed dicts (see `contract.snapshots` for why), published as JSON Schema
by `contract.schemas` and checked against a realistic history by the tests."""

from __future__ import annotations

from enum import StrEnum

from typing_extensions import TypedDict

from contract.envelope import AggregateType, Decision, Priority, WorkflowStatus
from contract.snapshots import DocumentFields, StepTemplateSnapshot


class EventName(StrEnum):
    USER_REGISTERED = "UserRegistered"
    USER_RENAMED = "UserRenamed"
    DEFINITION_CREATED = "DefinitionCreated"
    WORKFLOW_CREATED = "WorkflowCreated"
    WORKFLOW_SUBMITTED = "WorkflowSubmitted"
    WORKFLOW_RESUBMITTED = "WorkflowResubmitted"
    WORKFLOW_STEP_ASSIGNED = "WorkflowStepAssigned"
    WORKFLOW_STEP_COMPLETED = "WorkflowStepCompleted"
    WORKFLOW_APPROVED = "WorkflowApproved"
    WORKFLOW_REJECTED = "WorkflowRejected"
    WORKFLOW_CANCELLED = "WorkflowCancelled"
    COMMENT_ADDED = "CommentAdded"
    DOCUMENT_ATTACHED = "DocumentAttached"
    NOTIFICATION_PREFERENCES_SET = "NotificationPreferencesSet"
    DOCUMENTS_FINALIZED = "DocumentsFinalized"
    DOCUMENTS_UNFINALIZED = "DocumentsUnfinalized"
    WORKFLOW_COMPLETED = "WorkflowCompleted"
    WORKFLOW_COMPLETION_FAILED = "WorkflowCompletionFailed"


# --- payloads ----------------------------------------------------------------------


class ActorFields(TypedDict):
    """Who caused the event (every payload carries it)."""

    actor_id: str
    actor_name: str


class WorkflowRef(ActorFields):
    """Which workflow an event after its creation belongs to."""

    workflow_id: str
    workflow_title: str
    initiator_id: str | None


class UserRegistered(ActorFields):
    user_id: str
    display_name: str
    email: str
    registered_at: str


class UserRenamed(ActorFields):
    user_id: str
    old_display_name: str
    display_name: str
    renamed_at: str


class DefinitionCreated(ActorFields):
    definition_id: str
    name: str
    description: str | None
    steps: list[StepTemplateSnapshot]
    created_at: str


class CreatedStep(TypedDict):
    step_id: str
    name: str
    order: int
    assignee_id: str
    assignee_name: str


class WorkflowCreated(ActorFields):
    workflow_id: str
    title: str
    description: str | None
    priority: Priority
    due_date: str | None
    definition_id: str
    definition_name: str
    initiator_id: str
    initiator_name: str
    steps: list[CreatedStep]
    documents: list[DocumentFields]
    created_at: str


class WorkflowSubmitted(WorkflowRef):
    submitted_at: str


class WorkflowResubmitted(WorkflowRef):
    step_id: str
    comment: str | None
    resubmitted_at: str


class WorkflowStepAssigned(WorkflowRef):
    step_id: str
    step_name: str
    order: int
    assignee_id: str
    assignee_name: str
    due_date: str | None
    priority: Priority
    reason: str  # submitted | advanced | delegated | resubmitted
    assigned_at: str


class WorkflowStepCompleted(WorkflowRef):
    step_id: str
    step_name: str
    order: int
    decision: Decision
    comment: str | None
    next_step_id: str | None
    delegate_to_id: str | None
    delegate_to_name: str | None
    completed_at: str


class WorkflowApproved(WorkflowRef):
    step_id: str
    comment: str | None
    completed_at: str


class WorkflowRejected(WorkflowRef):
    step_id: str
    comment: str
    skipped_step_ids: list[str]
    completed_at: str


class WorkflowCancelled(WorkflowRef):
    reason: str | None
    previous_status: WorkflowStatus
    skipped_step_ids: list[str]
    cancelled_at: str


class CommentAdded(WorkflowRef):
    comment_id: str
    body: str
    created_at: str


class DocumentAttached(WorkflowRef, DocumentFields):
    attached_at: str


class NotificationPreferencesSet(ActorFields):
    user_id: str
    locale: str  # "ja" or "en"
    channels: list[str]  # of "email", "chat"
    chat_webhook_url: str | None
    set_at: str


class ManifestEntry(TypedDict):
    document_id: str
    filename: str
    sha256: str | None
    size_bytes: int


class DocumentsFinalized(WorkflowRef):
    """The completion saga's first step: the documents as approved, fixed."""

    manifest: list[ManifestEntry]
    manifest_sha256: str  # over the manifest's canonical JSON
    finalized_at: str


class DocumentsUnfinalized(WorkflowRef):
    """Compensation: the completion failed after the documents were finalized."""

    reason: str
    unfinalized_at: str


class WorkflowCompleted(WorkflowRef):
    """The completion saga ran every step (a step without an endpoint counts as skipped)."""

    skipped_steps: list[str]
    completed_at: str


class WorkflowCompletionFailed(WorkflowRef):
    failed_step: str
    reason: str
    failed_at: str


Payload = (UserRegistered | UserRenamed | DefinitionCreated | WorkflowCreated
           | WorkflowSubmitted | WorkflowResubmitted | WorkflowStepAssigned
           | WorkflowStepCompleted | WorkflowApproved | WorkflowRejected | WorkflowCancelled
           | CommentAdded | DocumentAttached | NotificationPreferencesSet
           | DocumentsFinalized | DocumentsUnfinalized | WorkflowCompleted
           | WorkflowCompletionFailed)

# Each event type: its aggregate and its payload's model (one row per EventName).
EVENTS: dict[EventName, tuple[AggregateType, type]] = {
    EventName.USER_REGISTERED: (AggregateType.USER, UserRegistered),
    EventName.USER_RENAMED: (AggregateType.USER, UserRenamed),
    EventName.DEFINITION_CREATED: (AggregateType.DEFINITION, DefinitionCreated),
    EventName.WORKFLOW_CREATED: (AggregateType.WORKFLOW, WorkflowCreated),
    EventName.WORKFLOW_SUBMITTED: (AggregateType.WORKFLOW, WorkflowSubmitted),
    EventName.WORKFLOW_RESUBMITTED: (AggregateType.WORKFLOW, WorkflowResubmitted),
    EventName.WORKFLOW_STEP_ASSIGNED: (AggregateType.WORKFLOW, WorkflowStepAssigned),
    EventName.WORKFLOW_STEP_COMPLETED: (AggregateType.WORKFLOW, WorkflowStepCompleted),
    EventName.WORKFLOW_APPROVED: (AggregateType.WORKFLOW, WorkflowApproved),
    EventName.WORKFLOW_REJECTED: (AggregateType.WORKFLOW, WorkflowRejected),
    EventName.WORKFLOW_CANCELLED: (AggregateType.WORKFLOW, WorkflowCancelled),
    EventName.COMMENT_ADDED: (AggregateType.WORKFLOW, CommentAdded),
    EventName.DOCUMENT_ATTACHED: (AggregateType.WORKFLOW, DocumentAttached),
    EventName.NOTIFICATION_PREFERENCES_SET: (AggregateType.USER, NotificationPreferencesSet),
    EventName.DOCUMENTS_FINALIZED: (AggregateType.WORKFLOW, DocumentsFinalized),
    EventName.DOCUMENTS_UNFINALIZED: (AggregateType.WORKFLOW, DocumentsUnfinalized),
    EventName.WORKFLOW_COMPLETED: (AggregateType.WORKFLOW, WorkflowCompleted),
    EventName.WORKFLOW_COMPLETION_FAILED: (AggregateType.WORKFLOW, WorkflowCompletionFailed),
}


class NotificationCommand(TypedDict):
    """A record on ringiflow.notification.commands (key: user_id): one notification to
    one recipient; `notification_id` is deterministic, so a redelivered or re-derived
    command is recognised and delivered once."""

    notification_id: str
    type: str  # ApprovalRequested, WorkflowApproved, ..., WorkflowCompleted, ...
    user_id: str
    tenant_id: str
    workflow_id: str
    title: str | None
    step_name: str | None
    comment: str | None
    due_date: str | None
    caused_by: str  # the event (or saga step) that caused it


def names_of(aggregate_type: AggregateType) -> list[EventName]:
    return [name for name, (kind, _) in EVENTS.items() if kind is aggregate_type]

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


Payload = (UserRegistered | UserRenamed | DefinitionCreated | WorkflowCreated
           | WorkflowSubmitted | WorkflowResubmitted | WorkflowStepAssigned
           | WorkflowStepCompleted | WorkflowApproved | WorkflowRejected | WorkflowCancelled
           | CommentAdded | DocumentAttached)

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
}


def names_of(aggregate_type: AggregateType) -> list[EventName]:
    return [name for name, (kind, _) in EVENTS.items() if kind is aggregate_type]

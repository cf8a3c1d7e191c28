"""A workflow's state after one of its events."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime
from typing import Any
from uuid import UUID

from commands.domain.common import parse_time
from commands.domain.workflow.state import Comment, Document, StepState, WorkflowState
from contract import (
    Decision,
    DocumentFields,
    EventName,
    Priority,
    StepStatus,
    WorkflowStatus,
    events,
)


def document_from(payload: DocumentFields, by_id: str, by_name: str, at: str) -> Document:
    return Document(
        document_id=UUID(payload["document_id"]),
        filename=payload["filename"],
        content_type=payload["content_type"],
        size_bytes=payload["size_bytes"],
        sha256=payload["sha256"],
        url=payload["url"],
        attached_by_id=UUID(by_id),
        attached_by_name=by_name,
        attached_at=datetime.fromisoformat(at),
    )


def workflow_created(state: WorkflowState, payload: events.WorkflowCreated) -> WorkflowState:
    created_at = payload["created_at"]
    return replace(
        state,
        status=WorkflowStatus.DRAFT,
        definition_id=UUID(payload["definition_id"]),
        definition_name=payload["definition_name"],
        title=payload["title"],
        description=payload["description"],
        priority=Priority(payload["priority"]),
        due_date=parse_time(payload["due_date"]),
        initiator_id=UUID(payload["initiator_id"]),
        initiator_name=payload["initiator_name"],
        steps=tuple(
            StepState(
                step_id=UUID(s["step_id"]),
                name=s["name"],
                order=s["order"],
                assignee_id=UUID(s["assignee_id"]),
                assignee_name=s["assignee_name"],
            )
            for s in payload["steps"]
        ),
        documents=tuple(
            document_from(d, payload["initiator_id"], payload["initiator_name"], created_at)
            for d in payload["documents"]
        ),
        created_at=parse_time(created_at),
        updated_at=parse_time(created_at),
    )


def workflow_submitted(state: WorkflowState, payload: events.WorkflowSubmitted) -> WorkflowState:
    submitted_at = parse_time(payload["submitted_at"])
    return replace(
        state, status=WorkflowStatus.IN_PROGRESS, submitted_at=submitted_at, updated_at=submitted_at
    )


def workflow_resubmitted(
    state: WorkflowState, payload: events.WorkflowResubmitted
) -> WorkflowState:
    return replace(
        state,
        status=WorkflowStatus.IN_PROGRESS,
        updated_at=parse_time(payload["resubmitted_at"]),
    )


def with_step(state: WorkflowState, step_id: UUID, **changes: Any) -> tuple[StepState, ...]:
    return tuple(replace(s, **changes) if s.step_id == step_id else s for s in state.steps)


def step_was_assigned(state: WorkflowState, payload: events.WorkflowStepAssigned) -> WorkflowState:
    step_id = UUID(payload["step_id"])
    assigned_at = parse_time(payload["assigned_at"])
    steps = with_step(
        state,
        step_id,
        assignee_id=UUID(payload["assignee_id"]),
        assignee_name=payload["assignee_name"],
        status=StepStatus.PENDING,
        assigned_at=assigned_at,
        decision=None,
        decided_at=None,
        comment=None,
    )
    return replace(state, steps=steps, current_step_id=step_id, updated_at=assigned_at)


def step_was_completed(
    state: WorkflowState, payload: events.WorkflowStepCompleted
) -> WorkflowState:
    step = state.step(UUID(payload["step_id"]))
    decision = Decision(payload["decision"])
    completed_at = parse_time(payload["completed_at"])
    delegated_from = step.delegated_from
    if decision is Decision.DELEGATED:
        delegated_from = (*delegated_from, step.assignee_id)
    steps = with_step(
        state,
        step.step_id,
        status=StepStatus(decision.value),
        decision=decision,
        decided_at=completed_at,
        comment=payload["comment"],
        delegated_from=delegated_from,
    )
    status = state.status
    if decision is Decision.CHANGES_REQUESTED:
        status = WorkflowStatus.CHANGES_REQUESTED
    return replace(state, steps=steps, status=status, updated_at=completed_at)


def close(
    state: WorkflowState, status: WorkflowStatus, skipped_step_ids: Iterable[str] = ()
) -> WorkflowState:
    skipped = {UUID(step_id) for step_id in skipped_step_ids}
    steps = tuple(
        replace(s, status=StepStatus.SKIPPED) if s.step_id in skipped else s for s in state.steps
    )
    return replace(state, status=status, steps=steps, current_step_id=None)


def workflow_approved(state: WorkflowState, payload: events.WorkflowApproved) -> WorkflowState:
    completed_at = parse_time(payload["completed_at"])
    closed = close(state, WorkflowStatus.APPROVED)
    return replace(closed, completed_at=completed_at, updated_at=completed_at)


def workflow_rejected(state: WorkflowState, payload: events.WorkflowRejected) -> WorkflowState:
    completed_at = parse_time(payload["completed_at"])
    closed = close(state, WorkflowStatus.REJECTED, payload["skipped_step_ids"])
    return replace(closed, completed_at=completed_at, updated_at=completed_at)


def workflow_cancelled(state: WorkflowState, payload: events.WorkflowCancelled) -> WorkflowState:
    cancelled_at = parse_time(payload["cancelled_at"])
    closed = close(state, WorkflowStatus.CANCELLED, payload["skipped_step_ids"])
    return replace(
        closed, cancelled_at=cancelled_at, cancel_reason=payload["reason"], updated_at=cancelled_at
    )


def comment_added(state: WorkflowState, payload: events.CommentAdded) -> WorkflowState:
    created_at = datetime.fromisoformat(payload["created_at"])
    comment = Comment(
        comment_id=UUID(payload["comment_id"]),
        author_id=UUID(payload["actor_id"]),
        author_name=payload["actor_name"],
        body=payload["body"],
        created_at=created_at,
    )
    return replace(state, comments=(*state.comments, comment), updated_at=created_at)


def document_attached(state: WorkflowState, payload: events.DocumentAttached) -> WorkflowState:
    document = document_from(
        payload, payload["actor_id"], payload["actor_name"], payload["attached_at"]
    )
    return replace(state, documents=(*state.documents, document), updated_at=document.attached_at)


def documents_finalized(state: WorkflowState,
                        payload: events.DocumentsFinalized) -> WorkflowState:
    return replace(state, documents_finalized=True, manifest_sha256=payload["manifest_sha256"],
                   updated_at=parse_time(payload["finalized_at"]))


def documents_unfinalized(state: WorkflowState,
                          payload: events.DocumentsUnfinalized) -> WorkflowState:
    return replace(state, documents_finalized=False,
                   updated_at=parse_time(payload["unfinalized_at"]))


def workflow_completed(state: WorkflowState, payload: events.WorkflowCompleted) -> WorkflowState:
    return replace(state, completion="completed", completion_error=None,
                   updated_at=parse_time(payload["completed_at"]))


def completion_failed(state: WorkflowState,
                      payload: events.WorkflowCompletionFailed) -> WorkflowState:
    return replace(state, completion="completion_failed",
                   completion_error=f"{payload['failed_step']}: {payload['reason']}",
                   updated_at=parse_time(payload["failed_at"]))


EVOLVERS = {
    EventName.DOCUMENTS_FINALIZED: documents_finalized,
    EventName.DOCUMENTS_UNFINALIZED: documents_unfinalized,
    EventName.WORKFLOW_COMPLETED: workflow_completed,
    EventName.WORKFLOW_COMPLETION_FAILED: completion_failed,
    EventName.WORKFLOW_CREATED: workflow_created,
    EventName.WORKFLOW_SUBMITTED: workflow_submitted,
    EventName.WORKFLOW_RESUBMITTED: workflow_resubmitted,
    EventName.WORKFLOW_STEP_ASSIGNED: step_was_assigned,
    EventName.WORKFLOW_STEP_COMPLETED: step_was_completed,
    EventName.WORKFLOW_APPROVED: workflow_approved,
    EventName.WORKFLOW_REJECTED: workflow_rejected,
    EventName.WORKFLOW_CANCELLED: workflow_cancelled,
    EventName.COMMENT_ADDED: comment_added,
    EventName.DOCUMENT_ATTACHED: document_attached,
}

"""A workflow's state, folded from its events, and its snapshot (what each of its
events carries as `aggregate`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from commands.domain.common import InvalidCommand, built_once, iso, iso_or_none, str_or_none
from contract import (
    TERMINAL_STATUSES,
    CommentSnapshot,
    Decision,
    DocumentSnapshot,
    Priority,
    StepSnapshot,
    StepStatus,
    WorkflowSnapshot,
    WorkflowStatus,
)


@dataclass(frozen=True)
class StepState:
    """One step of a workflow; steps are decided one after another, in ``order`` (from 1).

    Delegation keeps the step current and changes who decides it. The assignee's
    WorkflowStepCompleted(decision=delegated) marks the step ``delegated`` and appends the
    delegator to ``delegated_from``; the WorkflowStepAssigned that follows (same step_id) makes
    the delegate the assignee and the step ``pending`` again. ``delegated_from`` thus lists who
    handed the step on (oldest first) and the events keep the full story (who, when, why).

    Every WorkflowStepAssigned clears the previous decision, so ``decision``, ``decided_at``
    and ``comment`` always belong to the current assignee.
    """

    step_id: UUID
    name: str
    order: int
    assignee_id: UUID
    assignee_name: str
    status: StepStatus = StepStatus.WAITING
    assigned_at: datetime | None = None
    decision: Decision | None = None
    decided_at: datetime | None = None
    comment: str | None = None
    delegated_from: tuple[UUID, ...] = ()

    @built_once
    def snapshot(self) -> StepSnapshot:
        return {
            "step_id": str(self.step_id),
            "name": self.name,
            "order": self.order,
            "assignee_id": str(self.assignee_id),
            "assignee_name": self.assignee_name,
            "status": self.status.value,
            "assigned_at": iso_or_none(self.assigned_at),
            "decision": None if self.decision is None else self.decision.value,
            "decided_at": iso_or_none(self.decided_at),
            "comment": self.comment,
            "delegated_from": [str(user_id) for user_id in self.delegated_from],
        }


@dataclass(frozen=True)
class Comment:
    comment_id: UUID
    author_id: UUID
    author_name: str
    body: str
    created_at: datetime

    @built_once
    def snapshot(self) -> CommentSnapshot:
        return {
            "comment_id": str(self.comment_id),
            "author_id": str(self.author_id),
            "author_name": self.author_name,
            "body": self.body,
            "created_at": iso(self.created_at),
        }


@dataclass(frozen=True)
class Document:
    """Metadata of an attached file; the bytes live elsewhere."""

    document_id: UUID
    filename: str
    content_type: str
    size_bytes: int
    sha256: str | None
    url: str | None
    attached_by_id: UUID
    attached_by_name: str
    attached_at: datetime

    @built_once
    def snapshot(self) -> DocumentSnapshot:
        return {
            "document_id": str(self.document_id),
            "filename": self.filename,
            "content_type": self.content_type,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "url": self.url,
            "attached_by_id": str(self.attached_by_id),
            "attached_by_name": self.attached_by_name,
            "attached_at": iso(self.attached_at),
        }


@dataclass(frozen=True)
class WorkflowState:
    id: UUID
    version: int = 0  # 0: not created yet
    status: WorkflowStatus | None = None
    definition_id: UUID | None = None
    definition_name: str = ""
    title: str = ""
    description: str | None = None
    priority: Priority = Priority.MEDIUM
    due_date: datetime | None = None
    initiator_id: UUID | None = None
    initiator_name: str = ""
    steps: tuple[StepState, ...] = ()
    # The step being decided; while changes are requested, the step waiting for the resubmit.
    current_step_id: UUID | None = None
    comments: tuple[Comment, ...] = ()
    documents: tuple[Document, ...] = ()
    created_at: datetime | None = None
    updated_at: datetime | None = None
    submitted_at: datetime | None = None
    completed_at: datetime | None = None  # approved or rejected
    cancelled_at: datetime | None = None
    cancel_reason: str | None = None
    # Set by the completion saga; in the snapshot once it ran (older ones lack them).
    documents_finalized: bool = False
    manifest_sha256: str | None = None
    completion: str | None = None  # "completed" | "completion_failed"
    completion_error: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def current_step(self) -> StepState | None:
        return next((s for s in self.steps if s.step_id == self.current_step_id), None)

    def step(self, step_id: UUID) -> StepState:
        for candidate in self.steps:
            if candidate.step_id == step_id:
                return candidate
        known = ", ".join(f"{s.step_id} ({s.name})" for s in self.steps)
        raise InvalidCommand(
            f"workflow {self.id} has no step {step_id}; use one of its step ids: {known}"
        )

    def snapshot(self) -> WorkflowSnapshot:
        current = self.current_step
        snapshot: WorkflowSnapshot = {
            "id": str(self.id),
            "version": self.version,
            "status": None if self.status is None else self.status.value,
            "definition_id": str_or_none(self.definition_id),
            "definition_name": self.definition_name,
            "title": self.title,
            "description": self.description,
            "priority": self.priority.value,
            "due_date": iso_or_none(self.due_date),
            "initiator_id": str_or_none(self.initiator_id),
            "initiator_name": self.initiator_name,
            "current_step_id": None if current is None else str(current.step_id),
            "current_step_name": None if current is None else current.name,
            "current_assignee_id": None if current is None else str(current.assignee_id),
            "current_assignee_name": None if current is None else current.assignee_name,
            "steps": [s.snapshot() for s in self.steps],
            "comments": [c.snapshot() for c in self.comments],
            "documents": [d.snapshot() for d in self.documents],
            "created_at": iso_or_none(self.created_at),
            "updated_at": iso_or_none(self.updated_at),
            "submitted_at": iso_or_none(self.submitted_at),
            "completed_at": iso_or_none(self.completed_at),
            "cancelled_at": iso_or_none(self.cancelled_at),
            "cancel_reason": self.cancel_reason,
        }
        if self.manifest_sha256 is not None or self.completion is not None:
            snapshot |= {"documents_finalized": self.documents_finalized,
                         "manifest_sha256": self.manifest_sha256,
                         "completion": self.completion,
                         "completion_error": self.completion_error}
        return snapshot

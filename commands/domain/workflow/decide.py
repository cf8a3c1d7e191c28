"""Deciding a workflow command: the events it produces, or a DomainError.

The guards run in one order for every command: existence, final status, permission,
status, step; so a refusal names the first thing that is wrong."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from uuid import UUID, uuid5

import orjson

from commands.domain.common import (
    MAX_TEXT_LENGTH,
    MAX_TITLE_LENGTH,
    Actor,
    AlreadyExists,
    DomainEvent,
    Forbidden,
    InvalidCommand,
    InvalidState,
    NotFound,
    actor_fields,
    iso,
    iso_or_none,
    optional_text,
    required_comment,
    str_or_none,
    text,
)
from commands.domain.workflow.commands import (
    AddComment,
    ApproveStep,
    AttachDocument,
    CancelWorkflow,
    CreateWorkflow,
    DelegateStep,
    DocumentInfo,
    FinalizeDocuments,
    RecordCompletion,
    RejectStep,
    RequestChanges,
    ResubmitWorkflow,
    SubmitWorkflow,
    UnfinalizeDocuments,
)
from commands.domain.workflow.state import StepState, WorkflowState
from contract import (
    Decision,
    DocumentFields,
    EventName,
    Priority,
    StepStatus,
    WorkflowStatus,
    events,
)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_TYPE = re.compile(r"[\w.+-]+/[\w.+-]+(;.*)?")


def document_payload(document: DocumentInfo) -> DocumentFields:
    filename = text(document.filename, "filename")
    if "/" in filename or "\\" in filename:
        raise InvalidCommand(
            f"filename {filename!r} contains a path; send the bare file name, e.g. 'quote.pdf'"
        )
    content_type = text(document.content_type, "content_type").lower()
    if not _CONTENT_TYPE.fullmatch(content_type):
        raise InvalidCommand(
            f"content_type {content_type!r} is not a media type; use e.g. 'application/pdf'"
        )
    size = document.size_bytes
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidCommand(f"size_bytes {size!r} must be a whole number of bytes, 0 or more")
    sha256 = optional_text(document.sha256, "sha256")
    if sha256 is not None and not _SHA256.fullmatch(sha256.lower()):
        raise InvalidCommand("sha256 must be 64 hexadecimal digits; send the file's SHA-256")
    return DocumentFields(
        document_id=str(document.document_id), filename=filename, content_type=content_type,
        size_bytes=size, sha256=None if sha256 is None else sha256.lower(),
        url=optional_text(document.url, "url"))


def step_id_of(workflow_id: UUID, order: int) -> UUID:
    # Derived, not random, so decide stays deterministic and step ids are unique per workflow.
    return uuid5(workflow_id, f"step/{order}")


def create_workflow(
    command: CreateWorkflow, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    if state.version:
        raise AlreadyExists(
            f"workflow {state.id} already exists; create a new workflow with another id"
        )
    title = text(command.title, "title", max_length=MAX_TITLE_LENGTH)
    definition_name = text(command.definition_name, "definition_name")
    try:
        priority = Priority(command.priority)
    except ValueError:
        raise InvalidCommand(
            f"priority {command.priority!r} is unknown; use one of "
            f"{', '.join(p.value for p in Priority)}"
        ) from None
    due_date = command.due_date
    if due_date is not None and due_date.tzinfo is None:
        raise InvalidCommand("due_date has no time zone; send it in UTC, e.g. ...T17:00:00Z")
    if due_date is not None and due_date <= now:
        raise InvalidCommand(f"due_date {iso(due_date)} is in the past; choose a future date")
    if not command.steps:
        raise InvalidCommand(
            f"definition {definition_name!r} has no steps; a workflow needs at least one step"
        )
    steps = [
        events.CreatedStep(
            step_id=str(step_id_of(state.id, order)), name=text(step.name, f"name of step {order}"),
            order=order, assignee_id=str(step.assignee_id),
            assignee_name=text(step.assignee_name, f"assignee_name of step {order}"))
        for order, step in enumerate(command.steps, start=1)
    ]
    documents = [document_payload(document) for document in command.documents]
    if len({d["document_id"] for d in documents}) != len(documents):
        raise InvalidCommand("documents repeat a document_id; give each document its own id")
    return [DomainEvent(EventName.WORKFLOW_CREATED, events.WorkflowCreated(
        workflow_id=str(state.id), title=title,
        description=optional_text(command.description, "description"), priority=priority,
        due_date=iso_or_none(due_date), definition_id=str(command.definition_id),
        definition_name=definition_name, initiator_id=str(actor.user_id),
        initiator_name=actor.name, steps=steps, documents=documents, created_at=iso(now),
        **actor_fields(actor)))]


STATUS_HINTS = {
    WorkflowStatus.DRAFT: "the initiator must submit it first",
    WorkflowStatus.IN_PROGRESS: "it is already being reviewed",
    WorkflowStatus.CHANGES_REQUESTED: "the initiator must resubmit it first",
}


def require_open(state: WorkflowState) -> None:
    if state.version == 0:
        raise NotFound(f"workflow {state.id} does not exist; create it with CreateWorkflow first")
    if state.is_terminal:
        raise InvalidState(
            f"workflow {state.id} is {state.status} and can no longer change; "
            "start a new workflow instead"
        )


def require_initiator(state: WorkflowState, actor: Actor, action: str) -> None:
    if actor.user_id != state.initiator_id:
        raise Forbidden(
            f"only the initiator of workflow {state.id} ({state.initiator_name}) may {action} it"
        )


def require_status(state: WorkflowState, expected: WorkflowStatus, action: str) -> None:
    if state.status is not expected:
        assert state.status is not None  # _require_open ran first
        raise InvalidState(
            f"cannot {action} workflow {state.id} while it is {state.status} "
            f"(only when {expected}); {STATUS_HINTS[state.status]}"
        )


def step_to_decide(state: WorkflowState, step_id: UUID, actor: Actor, action: str) -> StepState:
    require_open(state)
    require_status(state, WorkflowStatus.IN_PROGRESS, f"{action} a step of")
    step = state.step(step_id)
    if step.step_id != state.current_step_id or step.status is not StepStatus.PENDING:
        current = state.current_step
        assert current is not None  # an in-progress workflow always has a current step
        raise InvalidState(
            f"step {step.name!r} is {step.status}, not awaiting a decision; "
            f"decide the current step {current.name!r} ({current.step_id})"
        )
    if actor.user_id != step.assignee_id:
        raise Forbidden(
            f"only the assignee of step {step.name!r} ({step.assignee_name}) may {action} it"
        )
    return step


def workflow_ref(state: WorkflowState, actor: Actor) -> events.WorkflowRef:
    """What every workflow event after WorkflowCreated carries about its workflow."""
    return events.WorkflowRef(workflow_id=str(state.id), workflow_title=state.title,
                              initiator_id=str_or_none(state.initiator_id),
                              **actor_fields(actor))


def step_assigned(
    state: WorkflowState,
    step: StepState,
    assignee_id: UUID,
    assignee_name: str,
    reason: str,
    actor: Actor,
    now: datetime,
) -> DomainEvent:
    """``reason``: submitted | advanced | delegated | resubmitted (for notifications)."""
    return DomainEvent(EventName.WORKFLOW_STEP_ASSIGNED, events.WorkflowStepAssigned(
        **workflow_ref(state, actor), step_id=str(step.step_id), step_name=step.name,
        order=step.order, assignee_id=str(assignee_id), assignee_name=assignee_name,
        due_date=iso_or_none(state.due_date), priority=state.priority, reason=reason,
        assigned_at=iso(now)))


def step_completed(
    state: WorkflowState,
    step: StepState,
    decision: Decision,
    comment: str | None,
    actor: Actor,
    now: datetime,
    *,
    next_step_id: UUID | None = None,
    delegate_to: UUID | None = None,
    delegate_to_name: str | None = None,
) -> DomainEvent:
    return DomainEvent(EventName.WORKFLOW_STEP_COMPLETED, events.WorkflowStepCompleted(
        **workflow_ref(state, actor), step_id=str(step.step_id), step_name=step.name,
        order=step.order, decision=decision, comment=comment,
        next_step_id=str_or_none(next_step_id), delegate_to_id=str_or_none(delegate_to),
        delegate_to_name=delegate_to_name, completed_at=iso(now)))


def submit_workflow(
    command: SubmitWorkflow, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    require_open(state)
    require_initiator(state, actor, "submit")
    require_status(state, WorkflowStatus.DRAFT, "submit")
    first = state.steps[0]
    submitted = events.WorkflowSubmitted(**workflow_ref(state, actor), submitted_at=iso(now))
    return [
        DomainEvent(EventName.WORKFLOW_SUBMITTED, submitted),
        step_assigned(
            state, first, first.assignee_id, first.assignee_name, "submitted", actor, now
        ),
    ]


def resubmit_workflow(
    command: ResubmitWorkflow, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    require_open(state)
    require_initiator(state, actor, "resubmit")
    require_status(state, WorkflowStatus.CHANGES_REQUESTED, "resubmit")
    step = state.current_step
    assert step is not None  # the step that requested changes stays current
    resubmitted = events.WorkflowResubmitted(
        **workflow_ref(state, actor), step_id=str(step.step_id),
        comment=optional_text(command.comment, "comment"), resubmitted_at=iso(now))
    return [
        DomainEvent(EventName.WORKFLOW_RESUBMITTED, resubmitted),
        step_assigned(
            state, step, step.assignee_id, step.assignee_name, "resubmitted", actor, now
        ),
    ]


def approve_step(
    command: ApproveStep, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    step = step_to_decide(state, command.step_id, actor, "approve")
    comment = optional_text(command.comment, "comment")
    following = [s for s in state.steps if s.order > step.order]
    if following:
        after = following[0]
        return [
            step_completed(
                state, step, Decision.APPROVED, comment, actor, now, next_step_id=after.step_id
            ),
            step_assigned(
                state, after, after.assignee_id, after.assignee_name, "advanced", actor, now
            ),
        ]
    approved = events.WorkflowApproved(**workflow_ref(state, actor), step_id=str(step.step_id),
                                       comment=comment, completed_at=iso(now))
    return [
        step_completed(state, step, Decision.APPROVED, comment, actor, now),
        DomainEvent(EventName.WORKFLOW_APPROVED, approved),
    ]


def reject_step(
    command: RejectStep, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    step = step_to_decide(state, command.step_id, actor, "reject")
    comment = required_comment(command.comment, "reject a step")
    rejected = events.WorkflowRejected(
        **workflow_ref(state, actor), step_id=str(step.step_id), comment=comment,
        skipped_step_ids=[str(s.step_id) for s in state.steps if s.status is StepStatus.WAITING],
        completed_at=iso(now))
    return [
        step_completed(state, step, Decision.REJECTED, comment, actor, now),
        DomainEvent(EventName.WORKFLOW_REJECTED, rejected),
    ]


def request_changes(
    command: RequestChanges, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    step = step_to_decide(state, command.step_id, actor, "request changes on")
    comment = required_comment(command.comment, "request changes")
    return [step_completed(state, step, Decision.CHANGES_REQUESTED, comment, actor, now)]


def delegate_step(
    command: DelegateStep, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    step = step_to_decide(state, command.step_id, actor, "delegate")
    if command.delegate_to == actor.user_id:
        raise InvalidCommand(
            f"you are already the assignee of step {step.name!r}; delegate to another user"
        )
    delegate_name = text(command.delegate_to_name, "delegate_to_name")
    comment = optional_text(command.comment, "comment")
    return [
        step_completed(
            state,
            step,
            Decision.DELEGATED,
            comment,
            actor,
            now,
            delegate_to=command.delegate_to,
            delegate_to_name=delegate_name,
        ),
        step_assigned(state, step, command.delegate_to, delegate_name, "delegated", actor, now),
    ]


def cancel_workflow(
    command: CancelWorkflow, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    require_open(state)
    require_initiator(state, actor, "cancel")
    assert state.status is not None
    open_steps = {StepStatus.WAITING, StepStatus.PENDING}
    return [DomainEvent(EventName.WORKFLOW_CANCELLED, events.WorkflowCancelled(
        **workflow_ref(state, actor), reason=optional_text(command.reason, "reason"),
        previous_status=state.status,
        skipped_step_ids=[str(s.step_id) for s in state.steps if s.status in open_steps],
        cancelled_at=iso(now)))]


def add_comment(
    command: AddComment, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    require_open(state)
    body = text(command.body, "body", max_length=MAX_TEXT_LENGTH)
    return [DomainEvent(EventName.COMMENT_ADDED, events.CommentAdded(
        **workflow_ref(state, actor),
        # Derived from the new version (unique per workflow), so decide stays deterministic.
        comment_id=str(uuid5(state.id, f"comment/{state.version + 1}")), body=body,
        created_at=iso(now)))]


def attach_document(
    command: AttachDocument, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    require_open(state)
    if any(d.document_id == command.document_id for d in state.documents):
        raise AlreadyExists(
            f"document {command.document_id} is already attached to workflow {state.id}; "
            "attach a new version under a new document_id"
        )
    return [DomainEvent(EventName.DOCUMENT_ATTACHED, events.DocumentAttached(
        **workflow_ref(state, actor), **document_payload(command), attached_at=iso(now)))]


# --- completion (the saga's commands) -------------------------------------------------


def require_completing(state: WorkflowState, actor: Actor, action: str) -> None:
    if state.version == 0:
        raise NotFound(f"workflow {state.id} does not exist")
    if "system" not in actor.roles:
        raise Forbidden(f"only the completion saga may {action} (workflow {state.id})")
    if state.status is not WorkflowStatus.APPROVED:
        raise InvalidState(f"workflow {state.id} is {state.status}; only an approved "
                           f"workflow is completed, so it cannot {action}")
    if state.completion == "completed":  # a failed completion may be run again
        raise InvalidState(f"workflow {state.id} is already completed")


def manifest_of(state: WorkflowState) -> list[events.ManifestEntry]:
    return [events.ManifestEntry(document_id=str(d.document_id), filename=d.filename,
                                 sha256=d.sha256, size_bytes=d.size_bytes)
            for d in state.documents]


def finalize_documents(
    command: FinalizeDocuments, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    require_completing(state, actor, "finalize its documents")
    if state.documents_finalized:
        raise InvalidState(f"the documents of workflow {state.id} are already finalized")
    manifest = manifest_of(state)
    digest = hashlib.sha256(orjson.dumps(manifest, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return [DomainEvent(EventName.DOCUMENTS_FINALIZED, events.DocumentsFinalized(
        **workflow_ref(state, actor), manifest=manifest, manifest_sha256=digest,
        finalized_at=iso(now)))]


def unfinalize_documents(
    command: UnfinalizeDocuments, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    require_completing(state, actor, "un-finalize its documents")
    if not state.documents_finalized:
        raise InvalidState(f"the documents of workflow {state.id} are not finalized")
    return [DomainEvent(EventName.DOCUMENTS_UNFINALIZED, events.DocumentsUnfinalized(
        **workflow_ref(state, actor), reason=text(command.reason, "reason",
                                                  max_length=MAX_TEXT_LENGTH),
        unfinalized_at=iso(now)))]


def record_completion(
    command: RecordCompletion, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    require_completing(state, actor, "record its completion")
    if command.failed_step is None:
        return [DomainEvent(EventName.WORKFLOW_COMPLETED, events.WorkflowCompleted(
            **workflow_ref(state, actor), skipped_steps=list(command.skipped_steps),
            completed_at=iso(now)))]
    return [DomainEvent(EventName.WORKFLOW_COMPLETION_FAILED, events.WorkflowCompletionFailed(
        **workflow_ref(state, actor), failed_step=command.failed_step,
        reason=text(command.reason or "unknown", "reason", max_length=MAX_TEXT_LENGTH),
        failed_at=iso(now)))]


DECIDERS = {
    FinalizeDocuments: finalize_documents, UnfinalizeDocuments: unfinalize_documents,
    RecordCompletion: record_completion,
    CreateWorkflow: create_workflow, SubmitWorkflow: submit_workflow,
    ResubmitWorkflow: resubmit_workflow, ApproveStep: approve_step, RejectStep: reject_step,
    RequestChanges: request_changes, DelegateStep: delegate_step,
    CancelWorkflow: cancel_workflow, AddComment: add_comment, AttachDocument: attach_document,
}

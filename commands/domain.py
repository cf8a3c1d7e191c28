"""Pure domain logic of RingiFlow (SPEC §3): commands, events, states, decide/evolve/fold.

    decide(command, state, actor, now) -> list[DomainEvent]   (or raises a DomainError)
    evolve(state, event) -> state                              (one event, version + 1)
    fold(state, events) -> state                               (many events)

Nothing here does I/O or reads the clock: the caller folds the aggregate's stored events
onto ``initial_state(...)``, passes the actor and the time, and resolves cross-aggregate data
(definition steps, user display names) into the command. So every function is a deterministic
function of its arguments, and replaying the same events always yields the same state.

Event payloads are complete on their own, because projectors must never call back into the
write side: every payload carries ``actor_id`` and ``actor_name``; every workflow event except
WorkflowCreated also carries ``workflow_id``, ``workflow_title`` and ``initiator_id``. UUIDs
are strings and datetimes ISO 8601 UTC strings, so payloads and snapshots go through
``json.dumps`` unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from functools import reduce
from typing import Any, ClassVar, TypeVar
from uuid import UUID, uuid5

Payload = dict[str, Any]

# Limits match the read-model columns (seed 004 §15.2.3), so an accepted event always projects.
MAX_TITLE_LENGTH = 500
MAX_NAME_LENGTH = 255
# Descriptions, comments and reasons are prose; longer material belongs in an attached document.
MAX_TEXT_LENGTH = 10_000


class WorkflowStatus(StrEnum):
    DRAFT = "draft"
    IN_PROGRESS = "in_progress"
    CHANGES_REQUESTED = "changes_requested"
    APPROVED = "approved"
    REJECTED = "rejected"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset(
    {WorkflowStatus.APPROVED, WorkflowStatus.REJECTED, WorkflowStatus.CANCELLED}
)


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


# --- errors -----------------------------------------------------------------


class DomainError(Exception):
    """A refused command: ``str(error)`` says what was wrong and what to do, ``code`` is for
    machines (the HTTP layer maps it to a status)."""

    code: ClassVar[str] = "domain_error"


class NotFound(DomainError):
    code = "not_found"


class AlreadyExists(DomainError):
    code = "already_exists"


class Forbidden(DomainError):
    code = "forbidden"


class InvalidState(DomainError):
    code = "invalid_state"


class InvalidCommand(DomainError):
    code = "invalid_command"


# --- actor and events ---------------------------------------------------------


@dataclass(frozen=True)
class Actor:
    user_id: UUID
    name: str
    roles: tuple[str, ...] = ()


@dataclass(frozen=True)
class DomainEvent:
    """What decide produces; the command layer wraps it in the contract's envelope."""

    event_type: str
    payload: Payload


# --- states -------------------------------------------------------------------


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("naive datetime: the domain only handles timezone-aware (UTC) times")
    return moment.astimezone(UTC).isoformat()


def _iso_or_none(moment: datetime | None) -> str | None:
    return None if moment is None else _iso(moment)


def _str_or_none(value: UUID | None) -> str | None:
    return None if value is None else str(value)


def _parse_time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


@dataclass(frozen=True)
class UserState:
    id: UUID
    version: int = 0  # 0: not registered yet
    display_name: str = ""
    email: str = ""
    registered_at: datetime | None = None
    updated_at: datetime | None = None

    def snapshot(self) -> Payload:
        return {
            "id": str(self.id),
            "version": self.version,
            "display_name": self.display_name,
            "email": self.email,
            "registered_at": _iso_or_none(self.registered_at),
            "updated_at": _iso_or_none(self.updated_at),
        }


@dataclass(frozen=True)
class StepTemplate:
    """A definition step: who decides it. Its order is its position in the definition."""

    name: str
    assignee_id: UUID


@dataclass(frozen=True)
class DefinitionState:
    id: UUID
    version: int = 0  # 0: not created yet
    name: str = ""
    description: str | None = None
    steps: tuple[StepTemplate, ...] = ()
    created_by_id: UUID | None = None
    created_by_name: str = ""
    created_at: datetime | None = None

    def snapshot(self) -> Payload:
        return {
            "id": str(self.id),
            "version": self.version,
            "name": self.name,
            "description": self.description,
            "steps": _template_payloads(self.steps),
            "created_by_id": _str_or_none(self.created_by_id),
            "created_by_name": self.created_by_name,
            "created_at": _iso_or_none(self.created_at),
        }


def _template_payloads(steps: Iterable[StepTemplate]) -> list[Payload]:
    return [
        {"order": order, "name": step.name, "assignee_id": str(step.assignee_id)}
        for order, step in enumerate(steps, start=1)
    ]


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

    def snapshot(self) -> Payload:
        return {
            "step_id": str(self.step_id),
            "name": self.name,
            "order": self.order,
            "assignee_id": str(self.assignee_id),
            "assignee_name": self.assignee_name,
            "status": self.status.value,
            "assigned_at": _iso_or_none(self.assigned_at),
            "decision": None if self.decision is None else self.decision.value,
            "decided_at": _iso_or_none(self.decided_at),
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

    def snapshot(self) -> Payload:
        return {
            "comment_id": str(self.comment_id),
            "author_id": str(self.author_id),
            "author_name": self.author_name,
            "body": self.body,
            "created_at": _iso(self.created_at),
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

    def snapshot(self) -> Payload:
        return {
            "document_id": str(self.document_id),
            "filename": self.filename,
            "content_type": self.content_type,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "url": self.url,
            "attached_by_id": str(self.attached_by_id),
            "attached_by_name": self.attached_by_name,
            "attached_at": _iso(self.attached_at),
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

    def snapshot(self) -> Payload:
        current = self.current_step
        return {
            "id": str(self.id),
            "version": self.version,
            "status": None if self.status is None else self.status.value,
            "definition_id": _str_or_none(self.definition_id),
            "definition_name": self.definition_name,
            "title": self.title,
            "description": self.description,
            "priority": self.priority.value,
            "due_date": _iso_or_none(self.due_date),
            "initiator_id": _str_or_none(self.initiator_id),
            "initiator_name": self.initiator_name,
            "current_step_id": None if current is None else str(current.step_id),
            "current_step_name": None if current is None else current.name,
            "current_assignee_id": None if current is None else str(current.assignee_id),
            "current_assignee_name": None if current is None else current.assignee_name,
            "steps": [s.snapshot() for s in self.steps],
            "comments": [c.snapshot() for c in self.comments],
            "documents": [d.snapshot() for d in self.documents],
            "created_at": _iso_or_none(self.created_at),
            "updated_at": _iso_or_none(self.updated_at),
            "submitted_at": _iso_or_none(self.submitted_at),
            "completed_at": _iso_or_none(self.completed_at),
            "cancelled_at": _iso_or_none(self.cancelled_at),
            "cancel_reason": self.cancel_reason,
        }


AggregateState = UserState | DefinitionState | WorkflowState
S = TypeVar("S", UserState, DefinitionState, WorkflowState)


def initial_user_state(aggregate_id: UUID) -> UserState:
    return UserState(id=aggregate_id)


def initial_definition_state(aggregate_id: UUID) -> DefinitionState:
    return DefinitionState(id=aggregate_id)


def initial_workflow_state(aggregate_id: UUID) -> WorkflowState:
    return WorkflowState(id=aggregate_id)


_INITIAL_STATES: dict[str, Callable[[UUID], AggregateState]] = {
    "user": initial_user_state,
    "definition": initial_definition_state,
    "workflow": initial_workflow_state,
}


def initial_state(aggregate_type: str, aggregate_id: UUID) -> AggregateState:
    """The empty state to fold an aggregate's events onto (``command.aggregate_type``)."""
    try:
        return _INITIAL_STATES[aggregate_type](aggregate_id)
    except KeyError:
        raise ValueError(
            f"unknown aggregate type {aggregate_type!r}; known: {', '.join(_INITIAL_STATES)}"
        ) from None


# --- commands -------------------------------------------------------------------


@dataclass(frozen=True)
class RegisterUser:
    aggregate_type: ClassVar[str] = "user"
    display_name: str
    email: str


@dataclass(frozen=True)
class RenameUser:
    aggregate_type: ClassVar[str] = "user"
    display_name: str


@dataclass(frozen=True)
class CreateDefinition:
    aggregate_type: ClassVar[str] = "definition"
    name: str
    steps: tuple[StepTemplate, ...]
    description: str | None = None


@dataclass(frozen=True)
class ResolvedStep:
    """A definition step with its assignee's display name, resolved by the caller."""

    name: str
    assignee_id: UUID
    assignee_name: str


@dataclass(frozen=True)
class DocumentInfo:
    """Document metadata. ``url`` must be a stable location: never a pre-signed link, because
    events are kept forever and must not carry secrets (SPEC §6)."""

    document_id: UUID
    filename: str
    content_type: str
    size_bytes: int
    sha256: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class CreateWorkflow:
    """Start a draft from a definition. The caller resolves the definition into
    ``definition_name`` and ``steps`` (see ``resolve_steps``); ``priority`` accepts the
    enum or its string value."""

    aggregate_type: ClassVar[str] = "workflow"
    definition_id: UUID
    definition_name: str
    steps: tuple[ResolvedStep, ...]
    title: str
    description: str | None = None
    priority: Priority | str = Priority.MEDIUM
    due_date: datetime | None = None
    documents: tuple[DocumentInfo, ...] = ()


@dataclass(frozen=True)
class SubmitWorkflow:
    aggregate_type: ClassVar[str] = "workflow"


@dataclass(frozen=True)
class ResubmitWorkflow:
    aggregate_type: ClassVar[str] = "workflow"
    comment: str | None = None


@dataclass(frozen=True)
class ApproveStep:
    aggregate_type: ClassVar[str] = "workflow"
    step_id: UUID
    comment: str | None = None


@dataclass(frozen=True)
class RejectStep:
    """``comment`` is required: the initiator must learn why."""

    aggregate_type: ClassVar[str] = "workflow"
    step_id: UUID
    comment: str


@dataclass(frozen=True)
class RequestChanges:
    """``comment`` is required: the initiator must learn what to change."""

    aggregate_type: ClassVar[str] = "workflow"
    step_id: UUID
    comment: str


@dataclass(frozen=True)
class DelegateStep:
    aggregate_type: ClassVar[str] = "workflow"
    step_id: UUID
    delegate_to: UUID
    delegate_to_name: str
    comment: str | None = None


@dataclass(frozen=True)
class CancelWorkflow:
    aggregate_type: ClassVar[str] = "workflow"
    reason: str | None = None


@dataclass(frozen=True)
class AddComment:
    aggregate_type: ClassVar[str] = "workflow"
    body: str


@dataclass(frozen=True)
class AttachDocument(DocumentInfo):
    aggregate_type: ClassVar[str] = "workflow"


Command = (
    RegisterUser
    | RenameUser
    | CreateDefinition
    | CreateWorkflow
    | SubmitWorkflow
    | ResubmitWorkflow
    | ApproveStep
    | RejectStep
    | RequestChanges
    | DelegateStep
    | CancelWorkflow
    | AddComment
    | AttachDocument
)


def resolve_steps(
    definition: DefinitionState, user_names: Mapping[UUID, str]
) -> tuple[ResolvedStep, ...]:
    """Turn a definition's steps into CreateWorkflow.steps, given assignee display names."""
    if definition.version == 0:
        raise NotFound(
            f"definition {definition.id} does not exist; create it with CreateDefinition first"
        )
    resolved = []
    for step in definition.steps:
        name = user_names.get(step.assignee_id)
        if name is None:
            raise NotFound(
                f"user {step.assignee_id}, assignee of step {step.name!r} of definition "
                f"{definition.name!r}, is not registered; register the user first"
            )
        resolved.append(ResolvedStep(step.name, step.assignee_id, name))
    return tuple(resolved)


# --- decide -----------------------------------------------------------------------

Decider = Callable[[Any, Any, Actor, datetime], list[DomainEvent]]
_DECIDERS: dict[type, Decider] = {}
_STATE_TYPES: dict[str, type] = {
    "user": UserState,
    "definition": DefinitionState,
    "workflow": WorkflowState,
}


def _decider(command_type: type) -> Callable[[Decider], Decider]:
    def register(fn: Decider) -> Decider:
        _DECIDERS[command_type] = fn
        return fn

    return register


def decide(
    command: Command, state: AggregateState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    """The events ``command`` produces on ``state``; raises a DomainError if refused.

    ``state`` is the aggregate folded so far (``initial_state`` when it has no events);
    ``now`` must be timezone-aware. Neither ``state`` nor ``command`` is modified.
    """
    decider = _DECIDERS.get(type(command))
    if decider is None:
        raise TypeError(f"{type(command).__name__} is not a RingiFlow command")
    expected = _STATE_TYPES[command.aggregate_type]
    if not isinstance(state, expected):
        raise TypeError(
            f"{type(command).__name__} applies to a {expected.__name__}, "
            f"not a {type(state).__name__}"
        )
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return decider(command, state, actor, now)


_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_TYPE = re.compile(r"[\w.+-]+/[\w.+-]+(;.*)?")


def _text(value: object, field: str, *, max_length: int = MAX_NAME_LENGTH) -> str:
    """``value`` stripped, or InvalidCommand naming the field."""
    cleaned = value.strip() if isinstance(value, str) else ""
    if not cleaned:
        raise InvalidCommand(f"{field} must not be empty; provide a non-blank {field}")
    if len(cleaned) > max_length:
        raise InvalidCommand(
            f"{field} is {len(cleaned)} characters long; shorten it to at most {max_length}"
        )
    return cleaned


def _optional_text(value: str | None, field: str) -> str | None:
    """``value`` stripped, None when blank, or InvalidCommand when too long."""
    cleaned = (value or "").strip()
    if len(cleaned) > MAX_TEXT_LENGTH:
        raise InvalidCommand(
            f"{field} is {len(cleaned)} characters long; shorten it to at most "
            f"{MAX_TEXT_LENGTH} or attach a document"
        )
    return cleaned or None


def _required_comment(value: str, action: str) -> str:
    cleaned = _optional_text(value, "comment")
    if cleaned is None:
        raise InvalidCommand(f"a comment is required to {action}; tell the initiator why")
    return cleaned


def _actor(actor: Actor) -> Payload:
    return {"actor_id": str(actor.user_id), "actor_name": actor.name}


@_decider(RegisterUser)
def _register_user(
    command: RegisterUser, state: UserState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    if state.version:
        raise AlreadyExists(
            f"user {state.id} is already registered; use RenameUser to change the display name"
        )
    display_name = _text(command.display_name, "display_name")
    email = _text(command.email, "email")
    if not _EMAIL.fullmatch(email):
        raise InvalidCommand(f"email {email!r} is not an address; use the form name@example.com")
    payload = {
        "user_id": str(state.id),
        "display_name": display_name,
        "email": email,
        "registered_at": _iso(now),
    }
    return [DomainEvent("UserRegistered", payload | _actor(actor))]


@_decider(RenameUser)
def _rename_user(
    command: RenameUser, state: UserState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    if state.version == 0:
        raise NotFound(f"user {state.id} does not exist; register it with RegisterUser first")
    display_name = _text(command.display_name, "display_name")
    if display_name == state.display_name:
        raise InvalidCommand(
            f"user {state.id} is already named {display_name!r}; send a different display_name"
        )
    payload = {
        "user_id": str(state.id),
        "old_display_name": state.display_name,
        "display_name": display_name,
        "renamed_at": _iso(now),
    }
    return [DomainEvent("UserRenamed", payload | _actor(actor))]


@_decider(CreateDefinition)
def _create_definition(
    command: CreateDefinition, state: DefinitionState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    if state.version:
        raise AlreadyExists(
            f"definition {state.id} already exists; create a new definition with another id"
        )
    name = _text(command.name, "name")
    if not command.steps:
        raise InvalidCommand(
            f"definition {name!r} has no steps; give it at least one step with an assignee"
        )
    steps = [
        StepTemplate(_text(step.name, f"name of step {order}"), step.assignee_id)
        for order, step in enumerate(command.steps, start=1)
    ]
    payload = {
        "definition_id": str(state.id),
        "name": name,
        "description": _optional_text(command.description, "description"),
        "steps": _template_payloads(steps),
        "created_at": _iso(now),
    }
    return [DomainEvent("DefinitionCreated", payload | _actor(actor))]


def _document_payload(document: DocumentInfo) -> Payload:
    filename = _text(document.filename, "filename")
    if "/" in filename or "\\" in filename:
        raise InvalidCommand(
            f"filename {filename!r} contains a path; send the bare file name, e.g. 'quote.pdf'"
        )
    content_type = _text(document.content_type, "content_type").lower()
    if not _CONTENT_TYPE.fullmatch(content_type):
        raise InvalidCommand(
            f"content_type {content_type!r} is not a media type; use e.g. 'application/pdf'"
        )
    size = document.size_bytes
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidCommand(f"size_bytes {size!r} must be a whole number of bytes, 0 or more")
    sha256 = _optional_text(document.sha256, "sha256")
    if sha256 is not None and not _SHA256.fullmatch(sha256.lower()):
        raise InvalidCommand("sha256 must be 64 hexadecimal digits; send the file's SHA-256")
    return {
        "document_id": str(document.document_id),
        "filename": filename,
        "content_type": content_type,
        "size_bytes": size,
        "sha256": None if sha256 is None else sha256.lower(),
        "url": _optional_text(document.url, "url"),
    }


def _step_id(workflow_id: UUID, order: int) -> UUID:
    # Derived, not random, so decide stays deterministic and step ids are unique per workflow.
    return uuid5(workflow_id, f"step/{order}")


@_decider(CreateWorkflow)
def _create_workflow(
    command: CreateWorkflow, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    if state.version:
        raise AlreadyExists(
            f"workflow {state.id} already exists; create a new workflow with another id"
        )
    title = _text(command.title, "title", max_length=MAX_TITLE_LENGTH)
    definition_name = _text(command.definition_name, "definition_name")
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
        raise InvalidCommand(f"due_date {_iso(due_date)} is in the past; choose a future date")
    if not command.steps:
        raise InvalidCommand(
            f"definition {definition_name!r} has no steps; a workflow needs at least one step"
        )
    steps = [
        {
            "step_id": str(_step_id(state.id, order)),
            "name": _text(step.name, f"name of step {order}"),
            "order": order,
            "assignee_id": str(step.assignee_id),
            "assignee_name": _text(step.assignee_name, f"assignee_name of step {order}"),
        }
        for order, step in enumerate(command.steps, start=1)
    ]
    documents = [_document_payload(document) for document in command.documents]
    if len({d["document_id"] for d in documents}) != len(documents):
        raise InvalidCommand("documents repeat a document_id; give each document its own id")
    payload = {
        "workflow_id": str(state.id),
        "title": title,
        "description": _optional_text(command.description, "description"),
        "priority": priority.value,
        "due_date": _iso_or_none(due_date),
        "definition_id": str(command.definition_id),
        "definition_name": definition_name,
        "initiator_id": str(actor.user_id),
        "initiator_name": actor.name,
        "steps": steps,
        "documents": documents,
        "created_at": _iso(now),
    }
    return [DomainEvent("WorkflowCreated", payload | _actor(actor))]


# Guards shared by the workflow commands, in the order they apply: existence, terminal
# status, permission, status, step.

_STATUS_HINTS = {
    WorkflowStatus.DRAFT: "the initiator must submit it first",
    WorkflowStatus.IN_PROGRESS: "it is already being reviewed",
    WorkflowStatus.CHANGES_REQUESTED: "the initiator must resubmit it first",
}


def _require_open(state: WorkflowState) -> None:
    if state.version == 0:
        raise NotFound(f"workflow {state.id} does not exist; create it with CreateWorkflow first")
    if state.is_terminal:
        raise InvalidState(
            f"workflow {state.id} is {state.status} and can no longer change; "
            "start a new workflow instead"
        )


def _require_initiator(state: WorkflowState, actor: Actor, action: str) -> None:
    if actor.user_id != state.initiator_id:
        raise Forbidden(
            f"only the initiator of workflow {state.id} ({state.initiator_name}) may {action} it"
        )


def _require_status(state: WorkflowState, expected: WorkflowStatus, action: str) -> None:
    if state.status is not expected:
        assert state.status is not None  # _require_open ran first
        raise InvalidState(
            f"cannot {action} workflow {state.id} while it is {state.status} "
            f"(only when {expected}); {_STATUS_HINTS[state.status]}"
        )


def _step_to_decide(state: WorkflowState, step_id: UUID, actor: Actor, action: str) -> StepState:
    _require_open(state)
    _require_status(state, WorkflowStatus.IN_PROGRESS, f"{action} a step of")
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


def _workflow_ref(state: WorkflowState) -> Payload:
    return {
        "workflow_id": str(state.id),
        "workflow_title": state.title,
        "initiator_id": _str_or_none(state.initiator_id),
    }


def _step_assigned(
    state: WorkflowState,
    step: StepState,
    assignee_id: UUID,
    assignee_name: str,
    reason: str,
    actor: Actor,
    now: datetime,
) -> DomainEvent:
    """``reason``: submitted | advanced | delegated | resubmitted (for notifications)."""
    payload = {
        "step_id": str(step.step_id),
        "step_name": step.name,
        "order": step.order,
        "assignee_id": str(assignee_id),
        "assignee_name": assignee_name,
        "due_date": _iso_or_none(state.due_date),
        "priority": state.priority.value,
        "reason": reason,
        "assigned_at": _iso(now),
    }
    return DomainEvent("WorkflowStepAssigned", _workflow_ref(state) | payload | _actor(actor))


def _step_completed(
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
    payload = {
        "step_id": str(step.step_id),
        "step_name": step.name,
        "order": step.order,
        "decision": decision.value,
        "comment": comment,
        "next_step_id": _str_or_none(next_step_id),
        "delegate_to_id": _str_or_none(delegate_to),
        "delegate_to_name": delegate_to_name,
        "completed_at": _iso(now),
    }
    return DomainEvent("WorkflowStepCompleted", _workflow_ref(state) | payload | _actor(actor))


@_decider(SubmitWorkflow)
def _submit_workflow(
    command: SubmitWorkflow, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    _require_open(state)
    _require_initiator(state, actor, "submit")
    _require_status(state, WorkflowStatus.DRAFT, "submit")
    first = state.steps[0]
    submitted = _workflow_ref(state) | {"submitted_at": _iso(now)} | _actor(actor)
    return [
        DomainEvent("WorkflowSubmitted", submitted),
        _step_assigned(
            state, first, first.assignee_id, first.assignee_name, "submitted", actor, now
        ),
    ]


@_decider(ResubmitWorkflow)
def _resubmit_workflow(
    command: ResubmitWorkflow, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    _require_open(state)
    _require_initiator(state, actor, "resubmit")
    _require_status(state, WorkflowStatus.CHANGES_REQUESTED, "resubmit")
    step = state.current_step
    assert step is not None  # the step that requested changes stays current
    resubmitted = _workflow_ref(state) | {
        "step_id": str(step.step_id),
        "comment": _optional_text(command.comment, "comment"),
        "resubmitted_at": _iso(now),
    }
    return [
        DomainEvent("WorkflowResubmitted", resubmitted | _actor(actor)),
        _step_assigned(
            state, step, step.assignee_id, step.assignee_name, "resubmitted", actor, now
        ),
    ]


@_decider(ApproveStep)
def _approve_step(
    command: ApproveStep, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    step = _step_to_decide(state, command.step_id, actor, "approve")
    comment = _optional_text(command.comment, "comment")
    following = [s for s in state.steps if s.order > step.order]
    if following:
        after = following[0]
        return [
            _step_completed(
                state, step, Decision.APPROVED, comment, actor, now, next_step_id=after.step_id
            ),
            _step_assigned(
                state, after, after.assignee_id, after.assignee_name, "advanced", actor, now
            ),
        ]
    approved = _workflow_ref(state) | {
        "step_id": str(step.step_id),
        "comment": comment,
        "completed_at": _iso(now),
    }
    return [
        _step_completed(state, step, Decision.APPROVED, comment, actor, now),
        DomainEvent("WorkflowApproved", approved | _actor(actor)),
    ]


@_decider(RejectStep)
def _reject_step(
    command: RejectStep, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    step = _step_to_decide(state, command.step_id, actor, "reject")
    comment = _required_comment(command.comment, "reject a step")
    rejected = _workflow_ref(state) | {
        "step_id": str(step.step_id),
        "comment": comment,
        "skipped_step_ids": [str(s.step_id) for s in state.steps if s.status is StepStatus.WAITING],
        "completed_at": _iso(now),
    }
    return [
        _step_completed(state, step, Decision.REJECTED, comment, actor, now),
        DomainEvent("WorkflowRejected", rejected | _actor(actor)),
    ]


@_decider(RequestChanges)
def _request_changes(
    command: RequestChanges, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    step = _step_to_decide(state, command.step_id, actor, "request changes on")
    comment = _required_comment(command.comment, "request changes")
    return [_step_completed(state, step, Decision.CHANGES_REQUESTED, comment, actor, now)]


@_decider(DelegateStep)
def _delegate_step(
    command: DelegateStep, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    step = _step_to_decide(state, command.step_id, actor, "delegate")
    if command.delegate_to == actor.user_id:
        raise InvalidCommand(
            f"you are already the assignee of step {step.name!r}; delegate to another user"
        )
    delegate_name = _text(command.delegate_to_name, "delegate_to_name")
    comment = _optional_text(command.comment, "comment")
    return [
        _step_completed(
            state,
            step,
            Decision.DELEGATED,
            comment,
            actor,
            now,
            delegate_to=command.delegate_to,
            delegate_to_name=delegate_name,
        ),
        _step_assigned(state, step, command.delegate_to, delegate_name, "delegated", actor, now),
    ]


@_decider(CancelWorkflow)
def _cancel_workflow(
    command: CancelWorkflow, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    _require_open(state)
    _require_initiator(state, actor, "cancel")
    assert state.status is not None
    open_steps = {StepStatus.WAITING, StepStatus.PENDING}
    cancelled = _workflow_ref(state) | {
        "reason": _optional_text(command.reason, "reason"),
        "previous_status": state.status.value,
        "skipped_step_ids": [str(s.step_id) for s in state.steps if s.status in open_steps],
        "cancelled_at": _iso(now),
    }
    return [DomainEvent("WorkflowCancelled", cancelled | _actor(actor))]


@_decider(AddComment)
def _add_comment(
    command: AddComment, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    _require_open(state)
    body = _text(command.body, "body", max_length=MAX_TEXT_LENGTH)
    added = _workflow_ref(state) | {
        # Derived from the new version (unique per workflow), so decide stays deterministic.
        "comment_id": str(uuid5(state.id, f"comment/{state.version + 1}")),
        "body": body,
        "created_at": _iso(now),
    }
    return [DomainEvent("CommentAdded", added | _actor(actor))]


@_decider(AttachDocument)
def _attach_document(
    command: AttachDocument, state: WorkflowState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    _require_open(state)
    if any(d.document_id == command.document_id for d in state.documents):
        raise AlreadyExists(
            f"document {command.document_id} is already attached to workflow {state.id}; "
            "attach a new version under a new document_id"
        )
    attached = _workflow_ref(state) | _document_payload(command) | {"attached_at": _iso(now)}
    return [DomainEvent("DocumentAttached", attached | _actor(actor))]


# --- evolve -------------------------------------------------------------------------

Evolver = Callable[[Any, Payload], Any]
_EVOLVERS: dict[tuple[type, str], Evolver] = {}


def _evolver(state_type: type, event_type: str) -> Callable[[Evolver], Evolver]:
    def register(fn: Evolver) -> Evolver:
        _EVOLVERS[(state_type, event_type)] = fn
        return fn

    return register


def evolve(state: S, event: DomainEvent) -> S:
    """``state`` after ``event``, with ``version`` one higher. Pure: returns a new state."""
    evolver = _EVOLVERS.get((type(state), event.event_type))
    if evolver is None:
        raise ValueError(f"{event.event_type} does not apply to a {type(state).__name__}")
    evolved: S = evolver(state, event.payload)
    return replace(evolved, version=state.version + 1)


def fold(state: S, events: Iterable[DomainEvent]) -> S:
    """``state`` after each of ``events`` in turn."""
    return reduce(evolve, events, state)


@_evolver(UserState, "UserRegistered")
def _user_registered(state: UserState, payload: Payload) -> UserState:
    registered_at = _parse_time(payload["registered_at"])
    return replace(
        state,
        display_name=payload["display_name"],
        email=payload["email"],
        registered_at=registered_at,
        updated_at=registered_at,
    )


@_evolver(UserState, "UserRenamed")
def _user_renamed(state: UserState, payload: Payload) -> UserState:
    return replace(
        state,
        display_name=payload["display_name"],
        updated_at=_parse_time(payload["renamed_at"]),
    )


@_evolver(DefinitionState, "DefinitionCreated")
def _definition_created(state: DefinitionState, payload: Payload) -> DefinitionState:
    return replace(
        state,
        name=payload["name"],
        description=payload["description"],
        steps=tuple(StepTemplate(s["name"], UUID(s["assignee_id"])) for s in payload["steps"]),
        created_by_id=UUID(payload["actor_id"]),
        created_by_name=payload["actor_name"],
        created_at=_parse_time(payload["created_at"]),
    )


def _document_from(payload: Payload, by_id: str, by_name: str, at: str) -> Document:
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


@_evolver(WorkflowState, "WorkflowCreated")
def _workflow_created(state: WorkflowState, payload: Payload) -> WorkflowState:
    created_at = payload["created_at"]
    return replace(
        state,
        status=WorkflowStatus.DRAFT,
        definition_id=UUID(payload["definition_id"]),
        definition_name=payload["definition_name"],
        title=payload["title"],
        description=payload["description"],
        priority=Priority(payload["priority"]),
        due_date=_parse_time(payload["due_date"]),
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
            _document_from(d, payload["initiator_id"], payload["initiator_name"], created_at)
            for d in payload["documents"]
        ),
        created_at=_parse_time(created_at),
        updated_at=_parse_time(created_at),
    )


@_evolver(WorkflowState, "WorkflowSubmitted")
def _workflow_submitted(state: WorkflowState, payload: Payload) -> WorkflowState:
    submitted_at = _parse_time(payload["submitted_at"])
    return replace(
        state, status=WorkflowStatus.IN_PROGRESS, submitted_at=submitted_at, updated_at=submitted_at
    )


@_evolver(WorkflowState, "WorkflowResubmitted")
def _workflow_resubmitted(state: WorkflowState, payload: Payload) -> WorkflowState:
    return replace(
        state,
        status=WorkflowStatus.IN_PROGRESS,
        updated_at=_parse_time(payload["resubmitted_at"]),
    )


def _with_step(state: WorkflowState, step_id: UUID, **changes: Any) -> tuple[StepState, ...]:
    return tuple(replace(s, **changes) if s.step_id == step_id else s for s in state.steps)


@_evolver(WorkflowState, "WorkflowStepAssigned")
def _step_was_assigned(state: WorkflowState, payload: Payload) -> WorkflowState:
    step_id = UUID(payload["step_id"])
    assigned_at = _parse_time(payload["assigned_at"])
    steps = _with_step(
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


@_evolver(WorkflowState, "WorkflowStepCompleted")
def _step_was_completed(state: WorkflowState, payload: Payload) -> WorkflowState:
    step = state.step(UUID(payload["step_id"]))
    decision = Decision(payload["decision"])
    completed_at = _parse_time(payload["completed_at"])
    delegated_from = step.delegated_from
    if decision is Decision.DELEGATED:
        delegated_from = (*delegated_from, step.assignee_id)
    steps = _with_step(
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


def _closed(
    state: WorkflowState, status: WorkflowStatus, skipped_step_ids: Iterable[str] = ()
) -> WorkflowState:
    skipped = {UUID(step_id) for step_id in skipped_step_ids}
    steps = tuple(
        replace(s, status=StepStatus.SKIPPED) if s.step_id in skipped else s for s in state.steps
    )
    return replace(state, status=status, steps=steps, current_step_id=None)


@_evolver(WorkflowState, "WorkflowApproved")
def _workflow_approved(state: WorkflowState, payload: Payload) -> WorkflowState:
    completed_at = _parse_time(payload["completed_at"])
    closed = _closed(state, WorkflowStatus.APPROVED)
    return replace(closed, completed_at=completed_at, updated_at=completed_at)


@_evolver(WorkflowState, "WorkflowRejected")
def _workflow_rejected(state: WorkflowState, payload: Payload) -> WorkflowState:
    completed_at = _parse_time(payload["completed_at"])
    closed = _closed(state, WorkflowStatus.REJECTED, payload["skipped_step_ids"])
    return replace(closed, completed_at=completed_at, updated_at=completed_at)


@_evolver(WorkflowState, "WorkflowCancelled")
def _workflow_cancelled(state: WorkflowState, payload: Payload) -> WorkflowState:
    cancelled_at = _parse_time(payload["cancelled_at"])
    closed = _closed(state, WorkflowStatus.CANCELLED, payload["skipped_step_ids"])
    return replace(
        closed, cancelled_at=cancelled_at, cancel_reason=payload["reason"], updated_at=cancelled_at
    )


@_evolver(WorkflowState, "CommentAdded")
def _comment_added(state: WorkflowState, payload: Payload) -> WorkflowState:
    created_at = datetime.fromisoformat(payload["created_at"])
    comment = Comment(
        comment_id=UUID(payload["comment_id"]),
        author_id=UUID(payload["actor_id"]),
        author_name=payload["actor_name"],
        body=payload["body"],
        created_at=created_at,
    )
    return replace(state, comments=(*state.comments, comment), updated_at=created_at)


@_evolver(WorkflowState, "DocumentAttached")
def _document_attached(state: WorkflowState, payload: Payload) -> WorkflowState:
    document = _document_from(
        payload, payload["actor_id"], payload["actor_name"], payload["attached_at"]
    )
    return replace(state, documents=(*state.documents, document), updated_at=document.attached_at)

"""What may be asked of a workflow. A command carries everything its decision needs:
the caller resolves other aggregates' data into it first (see `resolve_steps`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar
from uuid import UUID

from commands.domain.common import UnknownReference
from commands.domain.definition.state import DefinitionState
from contract import Priority


@dataclass(frozen=True)
class ResolvedStep:
    """A definition step with its assignee's display name, resolved by the caller."""

    name: str
    assignee_id: UUID
    assignee_name: str


@dataclass(frozen=True)
class DocumentInfo:
    """Document metadata. ``url`` must be a stable location: never a pre-signed link, because
    events are kept forever and must never carry a secret."""

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


def resolve_steps(
    definition: DefinitionState, user_names: Mapping[UUID, str]
) -> tuple[ResolvedStep, ...]:
    """Turn a definition's steps into CreateWorkflow.steps, given assignee display names."""
    if definition.version == 0:
        raise UnknownReference(
            f"definition_id {definition.id} does not exist; create it with CreateDefinition "
            "first")
    resolved = []
    for step in definition.steps:
        name = user_names.get(step.assignee_id)
        if name is None:
            raise UnknownReference(
                f"definition step assignee: user {step.assignee_id} of step {step.name!r} of "
                f"definition {definition.name!r} is not registered; register the user first")
        resolved.append(ResolvedStep(step.name, step.assignee_id, name))
    return tuple(resolved)


# --- the completion saga's commands (actor role "system" only) ---------------------


@dataclass(frozen=True)
class FinalizeDocuments:
    """Fix the approved workflow's documents: a manifest with each one's hash."""

    aggregate_type: ClassVar[str] = "workflow"


@dataclass(frozen=True)
class UnfinalizeDocuments:
    """Compensation: the completion failed after the documents were finalized."""

    aggregate_type: ClassVar[str] = "workflow"
    reason: str


@dataclass(frozen=True)
class RecordCompletion:
    """How the completion saga ended: `failed_step` None means completed."""

    aggregate_type: ClassVar[str] = "workflow"
    skipped_steps: tuple[str, ...] = ()
    failed_step: str | None = None
    reason: str | None = None

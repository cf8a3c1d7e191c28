"""Request bodies of the command API: strict (unknown fields rejected) and
bounded, so a bad request fails with a 422 naming the field before anything
is read or written."""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from commands.domain import MAX_NAME_LENGTH, MAX_TEXT_LENGTH, MAX_TITLE_LENGTH

MAX_STEPS = 20
MAX_DOCUMENTS = 20
MAX_DOCUMENT_BYTES = 1024**3  # metadata only; the file lives elsewhere

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                        max_length=MAX_NAME_LENGTH)]
Title = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                         max_length=MAX_TITLE_LENGTH)]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                        max_length=MAX_TEXT_LENGTH)]
Email = Annotated[str, StringConstraints(strip_whitespace=True, max_length=320,
                                         pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")]
ContentType = Annotated[str, StringConstraints(max_length=255,
                                               pattern=r"^[\w.+-]+/[\w.+-]+(;.*)?$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")]
Url = Annotated[str, StringConstraints(max_length=2048, pattern=r"^https?://\S+$")]


class CommandBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    expected_version: int | None = Field(
        default=None, ge=0,
        description="Refuse with 409 unless the aggregate is at exactly this version.",
    )


class RegisterUserBody(CommandBody):
    user_id: UUID | None = Field(
        default=None, description="The user's id (e.g. the identity provider's subject); "
        "generated when omitted. Tokens of this user carry it as `sub`.")
    display_name: Name
    email: Email


class RenameUserBody(CommandBody):
    display_name: Name


class StepTemplateBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Name
    assignee_id: UUID


class CreateDefinitionBody(CommandBody):
    name: Name
    description: Text | None = None
    steps: list[StepTemplateBody] = Field(min_length=1, max_length=MAX_STEPS)


class DocumentBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    document_id: UUID | None = Field(default=None, description="Generated when omitted.")
    filename: Name
    content_type: ContentType
    size_bytes: int = Field(ge=0, le=MAX_DOCUMENT_BYTES)
    sha256: Sha256 | None = None
    url: Url | None = None


class CreateWorkflowBody(CommandBody):
    definition_id: UUID
    title: Title
    description: Text | None = None
    priority: Literal["low", "medium", "high", "urgent"] = "medium"
    due_date: AwareDatetime | None = None
    documents: list[DocumentBody] = Field(default_factory=list, max_length=MAX_DOCUMENTS)


class SubmitBody(CommandBody):
    pass


class ResubmitBody(CommandBody):
    comment: Text | None = None


class ApproveBody(CommandBody):
    comment: Text | None = None


class DecisionWithReasonBody(CommandBody):
    comment: Text


class DelegateBody(CommandBody):
    delegate_to: UUID
    comment: Text | None = None


class CancelBody(CommandBody):
    reason: Text | None = None


class CommentBody(CommandBody):
    body: Text


class AttachDocumentBody(CommandBody, DocumentBody):
    pass


class CommandAccepted(BaseModel):
    """What every successful command returns."""

    aggregate_type: str
    aggregate_id: UUID
    version: int = Field(description="The aggregate's version after this command.")
    event_ids: list[UUID]
    consistency_token: str = Field(
        description="Send as X-Consistency-Token (or ?after=) to read your own write.")
    correlation_id: UUID
    command_id: UUID

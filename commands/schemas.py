"""Request bodies of the command API: strict (unknown fields rejected) and
bounded, so a bad request fails with a 422 naming the field before anything
is read or written."""

from __future__ import annotations

import re
from typing import Annotated, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
)

from commands.domain import MAX_NAME_LENGTH, MAX_TEXT_LENGTH, MAX_TITLE_LENGTH

MAX_STEPS = 20
MAX_DOCUMENTS = 20
MAX_DOCUMENT_BYTES = 1024**3  # metadata only; the file lives elsewhere
# Control characters (Unicode category Cc) and lone surrogates; free text may
# keep tab and line breaks.
FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
FORBIDDEN_MULTILINE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
INVISIBLE = re.compile(r"[\s\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064"
                       r"\u2066-\u206f\ufeff]*")


def _checked(multiline: bool) -> AfterValidator:
    """Text PostgreSQL and every reader can hold: no NUL or other control
    characters, no lone surrogates, and something visible -- zero-width
    characters alone are blank."""
    forbidden = FORBIDDEN_MULTILINE if multiline else FORBIDDEN

    def check(value: str) -> str:
        if found := forbidden.search(value):
            raise ValueError(f"must not contain control character U+{ord(found[0]):04X}")
        if value and INVISIBLE.fullmatch(value):
            raise ValueError("must contain visible characters, not only spaces or "
                             "zero-width characters")
        return value

    return AfterValidator(check)


Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                        max_length=MAX_NAME_LENGTH), _checked(False)]
Title = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                         max_length=MAX_TITLE_LENGTH), _checked(False)]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                        max_length=MAX_TEXT_LENGTH), _checked(True)]
Email = Annotated[str, StringConstraints(strip_whitespace=True, max_length=320,
                                         pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$"),
                  _checked(False)]
ContentType = Annotated[str, StringConstraints(max_length=255,
                                               pattern=r"^[\w.+-]+/[\w.+-]+(;.*)?$"),
                        _checked(False)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")]
Url = Annotated[str, StringConstraints(max_length=2048, pattern=r"^https?://\S+$"),
                _checked(False)]


class CommandBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    expected_version: StrictInt | None = Field(
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


class NotificationPreferencesBody(CommandBody):
    locale: Literal["ja", "en"] = Field(description="The language of your notifications.")
    channels: list[Literal["email", "chat"]] = Field(
        max_length=2, description="Where to be notified; an empty list opts out.")
    chat_webhook_url: Url | None = Field(
        default=None, description="A Slack/Teams-compatible incoming webhook (for `chat`).")


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
    size_bytes: StrictInt = Field(ge=0, le=MAX_DOCUMENT_BYTES)
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

"""What may be asked of a user."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


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
class SetNotificationPreferences:
    """How the user is notified: the language of the messages and the channels (none
    at all opts out). `chat` needs a webhook URL (Slack/Teams-compatible)."""

    aggregate_type: ClassVar[str] = "user"
    locale: str
    channels: tuple[str, ...]
    chat_webhook_url: str | None = None

"""A user's state, folded from its events."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from commands.domain.common import iso_or_none
from contract import UserSnapshot


@dataclass(frozen=True)
class UserState:
    id: UUID
    version: int = 0  # 0: not registered yet
    display_name: str = ""
    email: str = ""
    registered_at: datetime | None = None
    updated_at: datetime | None = None
    # Notification preferences; in the snapshot once set (older snapshots lack them).
    locale: str = "ja"
    channels: tuple[str, ...] = ("email",)
    chat_webhook_url: str | None = None
    preferences_set: bool = False

    def snapshot(self) -> UserSnapshot:
        snapshot: UserSnapshot = {
            "id": str(self.id),
            "version": self.version,
            "display_name": self.display_name,
            "email": self.email,
            "registered_at": iso_or_none(self.registered_at),
            "updated_at": iso_or_none(self.updated_at),
        }
        if self.preferences_set:
            snapshot |= {"locale": self.locale, "channels": list(self.channels),
                         "chat_webhook_url": self.chat_webhook_url}
        return snapshot

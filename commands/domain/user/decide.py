"""Deciding a user command: the events it produces, or a DomainError."""

from __future__ import annotations

import re
from datetime import datetime

from commands.domain.common import (
    Actor,
    AlreadyExists,
    DomainEvent,
    InvalidCommand,
    NotFound,
    actor_fields,
    iso,
    text,
)
from commands.domain.user.commands import RegisterUser, RenameUser, SetNotificationPreferences
from commands.domain.user.state import UserState
from contract import EventName, events

_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_URL = re.compile(r"https?://[^\s]+")
LOCALES = ("ja", "en")
CHANNELS = ("email", "chat")


def register_user(
    command: RegisterUser, state: UserState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    if state.version:
        raise AlreadyExists(
            f"user {state.id} is already registered; use RenameUser to change the display name"
        )
    display_name = text(command.display_name, "display_name")
    email = text(command.email, "email")
    if not _EMAIL.fullmatch(email):
        raise InvalidCommand(f"email {email!r} is not an address; use the form name@example.com")
    return [DomainEvent(EventName.USER_REGISTERED, events.UserRegistered(
        user_id=str(state.id), display_name=display_name, email=email,
        registered_at=iso(now), **actor_fields(actor)))]


def rename_user(
    command: RenameUser, state: UserState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    if state.version == 0:
        raise NotFound(f"user {state.id} does not exist; register it with RegisterUser first")
    display_name = text(command.display_name, "display_name")
    if display_name == state.display_name:
        raise InvalidCommand(
            f"user {state.id} is already named {display_name!r}; send a different display_name"
        )
    return [DomainEvent(EventName.USER_RENAMED, events.UserRenamed(
        user_id=str(state.id), old_display_name=state.display_name, display_name=display_name,
        renamed_at=iso(now), **actor_fields(actor)))]


def set_notification_preferences(
    command: SetNotificationPreferences, state: UserState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    if state.version == 0:
        raise NotFound(f"user {state.id} does not exist; register it with RegisterUser first")
    if command.locale not in LOCALES:
        raise InvalidCommand(f"locale {command.locale!r} is not offered; use one of "
                             f"{', '.join(LOCALES)}")
    unknown = [c for c in command.channels if c not in CHANNELS]
    if unknown or len(set(command.channels)) != len(command.channels):
        raise InvalidCommand(f"channels {list(command.channels)!r}: each of "
                             f"{', '.join(CHANNELS)} at most once (none opts out)")
    url = command.chat_webhook_url
    if url is not None and (len(url) > 2048 or not _URL.fullmatch(url)):
        raise InvalidCommand("chat_webhook_url must be an http(s) URL of at most 2048 "
                             "characters")
    if "chat" in command.channels and not url:
        raise InvalidCommand("the chat channel needs chat_webhook_url (the incoming webhook "
                             "of your Slack or Teams channel)")
    return [DomainEvent(EventName.NOTIFICATION_PREFERENCES_SET, events.NotificationPreferencesSet(
        user_id=str(state.id), locale=command.locale, channels=list(command.channels),
        chat_webhook_url=url, set_at=iso(now), **actor_fields(actor)))]


DECIDERS = {RegisterUser: register_user, RenameUser: rename_user,
            SetNotificationPreferences: set_notification_preferences}

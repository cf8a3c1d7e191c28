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
from commands.domain.user.commands import RegisterUser, RenameUser
from commands.domain.user.state import UserState
from contract import EventName, events

_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


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


DECIDERS = {RegisterUser: register_user, RenameUser: rename_user}

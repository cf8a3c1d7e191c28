"""A user's state after one of its events."""

from __future__ import annotations

from dataclasses import replace

from commands.domain.common import parse_time
from commands.domain.user.state import UserState
from contract import EventName, events


def user_registered(state: UserState, payload: events.UserRegistered) -> UserState:
    registered_at = parse_time(payload["registered_at"])
    return replace(
        state,
        display_name=payload["display_name"],
        email=payload["email"],
        registered_at=registered_at,
        updated_at=registered_at,
    )


def user_renamed(state: UserState, payload: events.UserRenamed) -> UserState:
    return replace(
        state,
        display_name=payload["display_name"],
        updated_at=parse_time(payload["renamed_at"]),
    )


def notification_preferences_set(state: UserState,
                                 payload: events.NotificationPreferencesSet) -> UserState:
    return replace(
        state,
        locale=payload["locale"],
        channels=tuple(payload["channels"]),
        chat_webhook_url=payload["chat_webhook_url"],
        preferences_set=True,
        updated_at=parse_time(payload["set_at"]),
    )


EVOLVERS = {EventName.USER_REGISTERED: user_registered, EventName.USER_RENAMED: user_renamed,
            EventName.NOTIFICATION_PREFERENCES_SET: notification_preferences_set}

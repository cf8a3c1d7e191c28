"""What every aggregate of the domain shares: errors, the actor, the event a decision
produces, limits and the validation and time helpers the deciders use.

Nothing in the domain does I/O or reads the clock (see `commands.domain`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar
from uuid import UUID

from contract import EventName, events

Payload = dict[str, Any]

# Limits match the read-model columns (the workflow_read_models migration), so an
# accepted event always projects.
MAX_TITLE_LENGTH = 500
MAX_NAME_LENGTH = 255
# Descriptions, comments and reasons are prose; longer material belongs in an attached document.
MAX_TEXT_LENGTH = 10_000


class DomainError(Exception):
    """A refused command: ``str(error)`` says what was wrong and what to do, ``code`` is for
    machines (the edge maps it to an HTTP status, `commands.errors`)."""

    code: ClassVar[str] = "domain_error"


class NotFound(DomainError):
    code = "not_found"


class UnknownReference(NotFound):
    """The command names another aggregate that does not exist (in this tenant)."""

    code = "unknown_reference"


class AlreadyExists(DomainError):
    code = "already_exists"


class Forbidden(DomainError):
    code = "forbidden"


class InvalidState(DomainError):
    code = "invalid_state"


class InvalidCommand(DomainError):
    code = "invalid_command"


@dataclass(frozen=True)
class Actor:
    user_id: UUID
    name: str
    roles: tuple[str, ...] = ()


@dataclass(frozen=True)
class DomainEvent:
    """What decide produces; the command layer wraps it in the contract's envelope.
    `payload` has the shape of the event type's model in `contract.events`."""

    event_type: EventName
    payload: Mapping[str, Any]


SnapshotT = TypeVar("SnapshotT", bound=Mapping[str, Any])


def built_once(snapshot: Callable[[Any], SnapshotT]) -> Callable[[Any], SnapshotT]:
    """For the snapshot of a frozen part of an aggregate (a comment, a document, a
    step): built on first use, then copied. Every event carries the whole aggregate,
    and the parts outlive many commands in the writer's cache, so without this a
    workflow's 20th comment would rebuild the 19 before it, str() of every UUID
    included. The copy is shallow: a caller's change to one event's snapshot never
    reaches the next."""
    kept = f"_built_{snapshot.__name__}"

    @functools.wraps(snapshot)
    def once(part: Any) -> SnapshotT:
        try:
            built = part.__dict__[kept]
        except KeyError:  # frozen: written past __setattr__, outside the fields
            built = part.__dict__[kept] = snapshot(part)
        return dict(built)  # type: ignore[return-value]

    return once


def iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("naive datetime: the domain only handles timezone-aware (UTC) times")
    return moment.astimezone(UTC).isoformat()


def iso_or_none(moment: datetime | None) -> str | None:
    return None if moment is None else iso(moment)


def str_or_none(value: UUID | None) -> str | None:
    return None if value is None else str(value)


def parse_time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def text(value: object, field: str, *, max_length: int = MAX_NAME_LENGTH) -> str:
    """``value`` stripped, or InvalidCommand naming the field."""
    cleaned = value.strip() if isinstance(value, str) else ""
    if not cleaned:
        raise InvalidCommand(f"{field} must not be empty; provide a non-blank {field}")
    if len(cleaned) > max_length:
        raise InvalidCommand(
            f"{field} is {len(cleaned)} characters long; shorten it to at most {max_length}"
        )
    return cleaned


def optional_text(value: str | None, field: str) -> str | None:
    """``value`` stripped, None when blank, or InvalidCommand when too long."""
    cleaned = (value or "").strip()
    if len(cleaned) > MAX_TEXT_LENGTH:
        raise InvalidCommand(
            f"{field} is {len(cleaned)} characters long; shorten it to at most "
            f"{MAX_TEXT_LENGTH} or attach a document"
        )
    return cleaned or None


def required_comment(value: str, action: str) -> str:
    cleaned = optional_text(value, "comment")
    if cleaned is None:
        raise InvalidCommand(f"a comment is required to {action}; tell the initiator why")
    return cleaned


def actor_fields(actor: Actor) -> events.ActorFields:
    return events.ActorFields(actor_id=str(actor.user_id), actor_name=actor.name)

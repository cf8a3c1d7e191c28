"""A definition's state after one of its events."""

from __future__ import annotations

from dataclasses import replace
from uuid import UUID

from commands.domain.common import parse_time
from commands.domain.definition.state import DefinitionState, StepTemplate
from contract import EventName, events


def definition_created(
    state: DefinitionState, payload: events.DefinitionCreated
) -> DefinitionState:
    return replace(
        state,
        name=payload["name"],
        description=payload["description"],
        steps=tuple(StepTemplate(s["name"], UUID(s["assignee_id"])) for s in payload["steps"]),
        created_by_id=UUID(payload["actor_id"]),
        created_by_name=payload["actor_name"],
        created_at=parse_time(payload["created_at"]),
    )


EVOLVERS = {EventName.DEFINITION_CREATED: definition_created}

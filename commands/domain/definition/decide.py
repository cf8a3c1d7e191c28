"""Deciding a definition command: the events it produces, or a DomainError."""

from __future__ import annotations

from datetime import datetime

from commands.domain.common import (
    Actor,
    AlreadyExists,
    DomainEvent,
    InvalidCommand,
    actor_fields,
    iso,
    optional_text,
    text,
)
from commands.domain.definition.commands import CreateDefinition
from commands.domain.definition.state import DefinitionState, StepTemplate, template_payloads
from contract import EventName, events


def create_definition(
    command: CreateDefinition, state: DefinitionState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    if state.version:
        raise AlreadyExists(
            f"definition {state.id} already exists; create a new definition with another id"
        )
    name = text(command.name, "name")
    if not command.steps:
        raise InvalidCommand(
            f"definition {name!r} has no steps; give it at least one step with an assignee"
        )
    steps = [
        StepTemplate(text(step.name, f"name of step {order}"), step.assignee_id)
        for order, step in enumerate(command.steps, start=1)
    ]
    return [DomainEvent(EventName.DEFINITION_CREATED, events.DefinitionCreated(
        definition_id=str(state.id), name=name,
        description=optional_text(command.description, "description"),
        steps=template_payloads(steps), created_at=iso(now), **actor_fields(actor)))]


DECIDERS = {CreateDefinition: create_definition}

"""Pure domain logic of RingiFlow: commands, events, states, decide/evolve/fold, a
package per aggregate (`user`, `definition`, `workflow`: state, commands, decide,
evolve).

    decide(command, state, actor, now) -> list[DomainEvent]   (or raises a DomainError)
    evolve(state, event) -> state                              (one event, version + 1)
    fold(state, events) -> state                               (many events)

Nothing here does I/O or reads the clock: the caller folds the aggregate's stored events
onto ``initial_state(...)``, passes the actor and the time, and resolves cross-aggregate
data (definition steps, user display names) into the command. So every function is a
deterministic function of its arguments, and replaying the same events always yields
the same state.

Event payloads are complete on their own, because projectors must never call back into
the write side: every payload carries ``actor_id`` and ``actor_name``; every workflow
event except WorkflowCreated also carries ``workflow_id``, ``workflow_title`` and
``initiator_id`` (their models are in `contract.events`). UUIDs are strings and
datetimes ISO 8601 UTC strings, so payloads and snapshots go through JSON unchanged.

Dispatch is by table: each aggregate's deciders by command type and evolvers by event
name. `tests/unit/test_domain_dispatch.py` proves the tables complete: every command
has a decider, every event type of an aggregate an evolver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from functools import reduce
from typing import Any, TypeVar
from uuid import UUID

from commands.domain import definition, user, workflow
from commands.domain.common import (
    MAX_NAME_LENGTH,
    MAX_TEXT_LENGTH,
    MAX_TITLE_LENGTH,
    Actor,
    AlreadyExists,
    DomainError,
    DomainEvent,
    Forbidden,
    InvalidCommand,
    InvalidState,
    NotFound,
    Payload,
    UnknownReference,
)
from commands.domain.definition.commands import CreateDefinition
from commands.domain.definition.decide import DECIDERS as DEFINITION_DECIDERS
from commands.domain.definition.evolve import EVOLVERS as DEFINITION_EVOLVERS
from commands.domain.definition.state import DefinitionState, StepTemplate
from commands.domain.user.commands import RegisterUser, RenameUser, SetNotificationPreferences
from commands.domain.user.decide import DECIDERS as USER_DECIDERS
from commands.domain.user.evolve import EVOLVERS as USER_EVOLVERS
from commands.domain.user.state import UserState
from commands.domain.workflow.commands import (
    AddComment,
    ApproveStep,
    AttachDocument,
    CancelWorkflow,
    CreateWorkflow,
    DelegateStep,
    DocumentInfo,
    FinalizeDocuments,
    RecordCompletion,
    RejectStep,
    RequestChanges,
    ResolvedStep,
    ResubmitWorkflow,
    SubmitWorkflow,
    UnfinalizeDocuments,
    resolve_steps,
)
from commands.domain.workflow.decide import DECIDERS as WORKFLOW_DECIDERS
from commands.domain.workflow.evolve import EVOLVERS as WORKFLOW_EVOLVERS
from commands.domain.workflow.state import Comment, Document, StepState, WorkflowState
from contract import (
    TERMINAL_STATUSES,
    AggregateType,
    Decision,
    EventName,
    Priority,
    StepStatus,
    WorkflowStatus,
)

Command = (
    RegisterUser | RenameUser | CreateDefinition | CreateWorkflow | SubmitWorkflow
    | ResubmitWorkflow | ApproveStep | RejectStep | RequestChanges | DelegateStep
    | CancelWorkflow | AddComment | AttachDocument | SetNotificationPreferences
    | FinalizeDocuments | UnfinalizeDocuments | RecordCompletion
)
AggregateState = UserState | DefinitionState | WorkflowState
S = TypeVar("S", UserState, DefinitionState, WorkflowState)
Decider = Callable[[Any, Any, Actor, datetime], list[DomainEvent]]
Evolver = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class Aggregate:
    """One aggregate type: its empty state, how it decides and how it evolves."""

    kind: AggregateType
    state: type
    deciders: Mapping[type, Decider]
    evolvers: Mapping[EventName, Evolver]


AGGREGATES: dict[AggregateType, Aggregate] = {
    AggregateType.USER: Aggregate(AggregateType.USER, UserState, USER_DECIDERS, USER_EVOLVERS),
    AggregateType.DEFINITION: Aggregate(AggregateType.DEFINITION, DefinitionState,
                                        DEFINITION_DECIDERS, DEFINITION_EVOLVERS),
    AggregateType.WORKFLOW: Aggregate(AggregateType.WORKFLOW, WorkflowState,
                                      WORKFLOW_DECIDERS, WORKFLOW_EVOLVERS),
}
_OF_STATE = {a.state: a for a in AGGREGATES.values()}
_OF_COMMAND = {command: a for a in AGGREGATES.values() for command in a.deciders}


def initial_state(aggregate_type: str, aggregate_id: UUID) -> AggregateState:
    """The empty state to fold an aggregate's events onto (``command.aggregate_type``)."""
    try:
        return AGGREGATES[AggregateType(aggregate_type)].state(id=aggregate_id)
    except ValueError:
        raise ValueError(f"unknown aggregate type {aggregate_type!r}; known: "
                         f"{', '.join(a.value for a in AggregateType)}") from None


def decide(
    command: Command, state: AggregateState, actor: Actor, now: datetime
) -> list[DomainEvent]:
    """The events ``command`` produces on ``state``; raises a DomainError if refused.

    ``state`` is the aggregate folded so far (``initial_state`` when it has no events);
    ``now`` must be timezone-aware. Neither ``state`` nor ``command`` is modified.
    """
    aggregate = _OF_COMMAND.get(type(command))
    if aggregate is None:
        raise TypeError(f"{type(command).__name__} is not a RingiFlow command")
    if not isinstance(state, aggregate.state):
        raise TypeError(
            f"{type(command).__name__} applies to a {aggregate.state.__name__}, "
            f"not a {type(state).__name__}"
        )
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return aggregate.deciders[type(command)](command, state, actor, now)


def evolve(state: S, event: DomainEvent) -> S:
    """``state`` after ``event``, with ``version`` one higher. Pure: returns a new state."""
    aggregate = _OF_STATE.get(type(state))
    evolver = aggregate.evolvers.get(EventName(event.event_type)) if aggregate else None
    if evolver is None:
        raise ValueError(f"{event.event_type} does not apply to a {type(state).__name__}")
    evolved: S = evolver(state, event.payload)
    return replace(evolved, version=state.version + 1)


def fold(state: S, events: Iterable[DomainEvent]) -> S:
    """``state`` after each of ``events`` in turn."""
    return reduce(evolve, events, state)


__all__ = [
    "AGGREGATES",
    "MAX_NAME_LENGTH",
    "MAX_TEXT_LENGTH",
    "MAX_TITLE_LENGTH",
    "TERMINAL_STATUSES",
    "Actor",
    "AddComment",
    "Aggregate",
    "AggregateState",
    "AlreadyExists",
    "ApproveStep",
    "AttachDocument",
    "CancelWorkflow",
    "Command",
    "Comment",
    "CreateDefinition",
    "CreateWorkflow",
    "Decision",
    "DefinitionState",
    "DelegateStep",
    "Document",
    "DocumentInfo",
    "DomainError",
    "DomainEvent",
    "EventName",
    "FinalizeDocuments",
    "Forbidden",
    "InvalidCommand",
    "InvalidState",
    "NotFound",
    "Payload",
    "Priority",
    "RecordCompletion",
    "RegisterUser",
    "RejectStep",
    "RenameUser",
    "RequestChanges",
    "ResolvedStep",
    "ResubmitWorkflow",
    "SetNotificationPreferences",
    "StepState",
    "StepStatus",
    "StepTemplate",
    "SubmitWorkflow",
    "UnfinalizeDocuments",
    "UnknownReference",
    "UserState",
    "WorkflowState",
    "WorkflowStatus",
    "decide",
    "definition",
    "evolve",
    "fold",
    "initial_state",
    "resolve_steps",
    "user",
    "workflow",
]

"""The domain's dispatch tables are complete: every command has a decider in the
aggregate it names, and every event type an aggregate can have an evolver there. A
new command or event type without its half fails here, before any HTTP call."""

from __future__ import annotations

import typing

import pytest

from commands.domain import AGGREGATES, Command
from contract import EVENTS, AggregateType, names_of


def test_every_command_is_decided_by_the_aggregate_it_names() -> None:
    commands = set(typing.get_args(Command))
    decided = {c: a.kind for a in AGGREGATES.values() for c in a.deciders}
    assert set(decided) == commands
    for command, kind in decided.items():
        assert command.aggregate_type == kind.value, command.__name__


@pytest.mark.parametrize("kind", list(AggregateType))
def test_every_event_type_of_an_aggregate_evolves_it(kind: AggregateType) -> None:
    assert set(AGGREGATES[kind].evolvers) == set(names_of(kind))


def test_every_event_type_belongs_to_one_aggregate() -> None:
    evolved = [name for a in AGGREGATES.values() for name in a.evolvers]
    assert sorted(evolved) == sorted(EVENTS)

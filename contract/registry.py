"""Known event types, their current schema versions and the upcasters between them:
reading an old event applies the chain, so handlers only ever see the current shape."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from contract.envelope import AggregateType, EventEnvelope
from contract.events import EVENTS

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class UnknownEventType(LookupError):
    """The consumer does not know this event type (non-retryable)."""


class UnsupportedSchemaVersion(LookupError):
    """The payload's schema_version is newer than this code understands (non-retryable)."""


@dataclass(frozen=True)
class EventType:
    name: str
    aggregate_type: AggregateType
    schema_version: int = 1
    description: str = ""


class EventRegistry:
    """Known event types, their current schema version and upcasters.

    An upcaster turns a payload of version N into version N+1; reading old
    events applies the chain, so handlers only ever see the current shape.
    """

    def __init__(self) -> None:
        self._types: dict[str, EventType] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}

    def register(self, event_type: EventType) -> EventType:
        if event_type.name in self._types:
            raise ValueError(f"event type {event_type.name!r} registered twice")
        self._types[event_type.name] = event_type
        return event_type

    def upcaster(self, name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        def decorate(fn: Upcaster) -> Upcaster:
            self._upcasters[(name, from_version)] = fn
            return fn

        return decorate

    def get(self, name: str) -> EventType:
        try:
            return self._types[name]
        except KeyError:
            raise UnknownEventType(
                f"unknown event type {name!r}; known: {', '.join(sorted(self._types))}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def names(self, aggregate_type: AggregateType | None = None) -> list[str]:
        return sorted(
            n for n, t in self._types.items() if aggregate_type in (None, t.aggregate_type)
        )

    def upcast(self, envelope: EventEnvelope) -> EventEnvelope:
        current = self.get(envelope.event_type).schema_version
        if envelope.schema_version > current:
            raise UnsupportedSchemaVersion(
                f"{envelope.event_type} schema_version {envelope.schema_version} is newer than "
                f"the supported {current}; upgrade this consumer"
            )
        payload, version = envelope.payload, envelope.schema_version
        while version < current:
            step = self._upcasters.get((envelope.event_type, version))
            if step is None:
                raise UnsupportedSchemaVersion(
                    f"no upcaster for {envelope.event_type} v{version} -> v{version + 1}"
                )
            payload, version = step(dict(payload)), version + 1
        if version == envelope.schema_version:
            return envelope
        return envelope.model_copy(update={"payload": payload, "schema_version": version})


REGISTRY = EventRegistry()
for _name, (_aggregate_type, _model) in EVENTS.items():
    REGISTRY.register(EventType(_name.value, _aggregate_type))


def stored_envelope(row: Mapping[str, Any]) -> EventEnvelope:
    """An event read back from the events table (replays, rebuilds), upcast to the
    shape handlers expect; unknown types and newer schemas raise as on Kafka."""
    return REGISTRY.upcast(EventEnvelope.model_validate(row))

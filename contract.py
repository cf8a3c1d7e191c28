"""The RingiFlow event contract (SPEC §2): envelope, event-type registry with
upcasting, Kafka record codec and topic catalogue.

This module is the one place every component agrees on. It imports none of
them, only the standard library and pydantic, so producers and consumers can
depend on it without depending on each other.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal
from uuid import UUID, uuid4

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class AggregateType(StrEnum):
    WORKFLOW = "workflow"
    DEFINITION = "definition"
    USER = "user"


class EventMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant_id: UUID
    user_id: UUID | None = None  # the actor; None for system-initiated events
    correlation_id: UUID
    causation_id: UUID | None = None
    trace_id: str | None = None  # W3C trace id, 32 lowercase hex digits
    is_reconstructed: bool = False


class EventEnvelope(BaseModel):
    """What travels on the wire, and what the events table stores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: UUID = Field(default_factory=uuid4)
    event_type: str = Field(min_length=1, max_length=100)
    schema_version: int = Field(default=1, ge=1)
    aggregate_type: AggregateType
    aggregate_id: UUID
    version: int = Field(ge=1)
    occurred_at: datetime
    payload: dict[str, Any]
    aggregate: dict[str, Any]
    metadata: EventMetadata

    @field_validator("occurred_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("occurred_at must be timezone-aware (UTC)")
        return value.astimezone(UTC)

    @property
    def tenant_id(self) -> UUID:
        return self.metadata.tenant_id


# --- event-type registry and upcasting -------------------------------------

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


def stored_envelope(row: Mapping[str, Any]) -> EventEnvelope:
    """An event read back from the events table (replays, rebuilds), upcast to the
    shape handlers expect; unknown types and newer schemas raise as on Kafka."""
    return REGISTRY.upcast(EventEnvelope.model_validate(row))

_EVENT_TYPES: dict[AggregateType, Sequence[str]] = {
    AggregateType.USER: ("UserRegistered", "UserRenamed"),
    AggregateType.DEFINITION: ("DefinitionCreated",),
    AggregateType.WORKFLOW: (
        "WorkflowCreated",
        "WorkflowSubmitted",
        "WorkflowResubmitted",
        "WorkflowStepAssigned",
        "WorkflowStepCompleted",
        "WorkflowApproved",
        "WorkflowRejected",
        "WorkflowCancelled",
        "CommentAdded",
        "DocumentAttached",
    ),
}
for _aggregate_type, _names in _EVENT_TYPES.items():
    for _name in _names:
        REGISTRY.register(EventType(_name, _aggregate_type))


# --- topic catalogue --------------------------------------------------------

DAY_MS = 24 * 60 * 60 * 1000


@dataclass(frozen=True)
class Topic:
    name: str
    partitions: int
    retention_ms: int
    cleanup_policy: Literal["delete", "compact", "compact,delete"] = "delete"
    key: str = "aggregate_id"

    def config(self) -> dict[str, str]:
        return {"retention.ms": str(self.retention_ms), "cleanup.policy": self.cleanup_policy}


def events_topic_name(aggregate_type: AggregateType | str) -> str:
    return f"ringiflow.{AggregateType(aggregate_type).value}.events"


WORKFLOW_EVENTS = Topic(events_topic_name(AggregateType.WORKFLOW), 12, 7 * DAY_MS)
# Compaction would keep only the newest event per aggregate, and projectors need
# every event; so these keep 7 days and the events table keeps everything.
DEFINITION_EVENTS = Topic(events_topic_name(AggregateType.DEFINITION), 3, 7 * DAY_MS)
USER_EVENTS = Topic(events_topic_name(AggregateType.USER), 3, 7 * DAY_MS)
AUDIT_EVENTS = Topic("ringiflow.audit.events", 12, 30 * DAY_MS, key="tenant_id")
NOTIFICATION_COMMANDS = Topic("ringiflow.notification.commands", 6, DAY_MS, key="user_id")

TOPICS: tuple[Topic, ...] = (
    WORKFLOW_EVENTS,
    DEFINITION_EVENTS,
    USER_EVENTS,
    AUDIT_EVENTS,
    NOTIFICATION_COMMANDS,
)

# One consumer group per projector / processor (SPEC §4), each with its own DLQ.
CONSUMER_GROUPS: tuple[str, ...] = (
    "workflow-projector",
    "cache-projector",
    "search-indexer",
    "audit-processor",
    "notification-processor",
)


def dlq_topic(group: str) -> Topic:
    return Topic(f"{group}.dlq", 3, 30 * DAY_MS)


def all_topics() -> tuple[Topic, ...]:
    return TOPICS + tuple(dlq_topic(g) for g in CONSUMER_GROUPS)


# --- W3C trace context ------------------------------------------------------


def new_trace_id() -> str:
    return os.urandom(16).hex()


def traceparent(trace_id: str, span_id: str | None = None, sampled: bool = True) -> str:
    """A W3C `traceparent` header value (version 00)."""
    span = span_id or os.urandom(8).hex()
    return f"00-{trace_id}-{span}-{'01' if sampled else '00'}"


def parse_traceparent(value: str) -> tuple[str, str]:
    """Return (trace_id, parent span id); raise ValueError when malformed."""
    parts = value.strip().split("-")
    if len(parts) != 4 or len(parts[0]) != 2 or len(parts[1]) != 32 or len(parts[2]) != 16:
        raise ValueError(f"malformed traceparent {value!r}")
    int(parts[1], 16), int(parts[2], 16)  # raises ValueError on non-hex
    if parts[1] == "0" * 32 or parts[2] == "0" * 16:
        raise ValueError(f"traceparent {value!r} has an all-zero id")
    return parts[1], parts[2]


# --- Kafka record codec -----------------------------------------------------


class UndecodableRecord(ValueError):
    """A Kafka record that is not a valid envelope (non-retryable: dead-letter it)."""


@dataclass(frozen=True)
class KafkaRecord:
    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode()
        return None


def encode_envelope(envelope: EventEnvelope) -> bytes:
    return envelope.model_dump_json().encode()


def record_headers(envelope: EventEnvelope,
                   span_id: str | None = None) -> tuple[tuple[str, bytes], ...]:
    """`span_id`: the span that appended the event (traced), else one derived from it."""
    meta = envelope.metadata
    headers = {
        "event_id": str(envelope.event_id),
        "event_type": envelope.event_type,
        "schema_version": str(envelope.schema_version),
        "aggregate_type": envelope.aggregate_type.value,
        "aggregate_id": str(envelope.aggregate_id),
        "version": str(envelope.version),
        "tenant_id": str(meta.tenant_id),
        "correlation_id": str(meta.correlation_id),
        "occurred_at": envelope.occurred_at.isoformat(),
    }
    if meta.causation_id:
        headers["causation_id"] = str(meta.causation_id)
    if meta.trace_id:
        # The span id is derived from the event id, so every re-publish of one
        # event carries the same parent span.
        headers["traceparent"] = traceparent(meta.trace_id, span_id or envelope.event_id.hex[:16])
    return tuple((k, v.encode()) for k, v in headers.items())


def to_record(envelope: EventEnvelope) -> KafkaRecord:
    return KafkaRecord(
        topic=events_topic_name(envelope.aggregate_type),
        key=str(envelope.aggregate_id).encode(),
        value=encode_envelope(envelope),
        headers=record_headers(envelope),
    )


def decode_envelope(
    value: bytes | str | Mapping[str, Any] | None, registry: EventRegistry = REGISTRY
) -> EventEnvelope:
    """Parse and upcast a record value; raise UndecodableRecord / UnknownEventType /
    UnsupportedSchemaVersion, all of which are non-retryable."""
    if value is None:
        raise UndecodableRecord("record has no value (tombstone)")
    try:
        if isinstance(value, Mapping):
            envelope = EventEnvelope.model_validate(value)
        else:
            envelope = EventEnvelope.model_validate_json(value)
    except ValidationError as exc:
        raise UndecodableRecord(f"not a RingiFlow event envelope: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UndecodableRecord(f"not JSON: {exc}") from exc
    return registry.upcast(envelope)


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- consistency token (read-your-writes, SPEC §5) ---------------------------

# PostgreSQL NOTIFY channel: a projector names what each batch it committed made
# visible, so the query API wakes only the waits those versions satisfy (one read
# each) instead of every wait of the tenant (a re-read per wait per batch).
APPLIED_NOTIFY_CHANNEL = "ringiflow_applied"
NOTIFY_PAYLOAD_MAX = 7900  # PostgreSQL's limit is 8000 bytes

Applied = tuple[UUID, UUID, int]  # (tenant_id, aggregate_id, version now visible)


def applied_payloads(read_model: str, applied: Iterable[Applied]) -> list[str]:
    """`read_model;tenant:aggregate:version,...` payloads, each within NOTIFY's limit;
    one entry per aggregate (its newest version)."""
    newest: dict[tuple[UUID, UUID], int] = {}
    for tenant, aggregate, version in applied:
        newest[(tenant, aggregate)] = max(version, newest.get((tenant, aggregate), 0))
    payloads, entries, size = [], [], len(read_model) + 1
    for (tenant, aggregate), version in newest.items():
        entry = f"{tenant}:{aggregate}:{version}"
        if entries and size + len(entry) + 1 > NOTIFY_PAYLOAD_MAX:
            payloads.append(f"{read_model};" + ",".join(entries))
            entries, size = [], len(read_model) + 1
        entries.append(entry)
        size += len(entry) + 1
    if entries:
        payloads.append(f"{read_model};" + ",".join(entries))
    return payloads


def parse_applied(payload: str) -> tuple[str, list[Applied]]:
    """The inverse of applied_payloads; a malformed entry is skipped."""
    read_model, _, rest = payload.partition(";")
    found: list[Applied] = []
    for entry in rest.split(","):
        try:
            tenant, aggregate, version = entry.split(":")
            found.append((UUID(tenant), UUID(aggregate), int(version)))
        except ValueError:
            continue
    return read_model, found


@dataclass(frozen=True)
class ConsistencyToken:
    """Where a command's write landed; a query waits until its read model has
    applied `version` of `aggregate_id`. Opaque to clients.

    It names only the caller's own aggregate and version: no global position,
    which would show other tenants' activity as gaps between two tokens."""

    aggregate_type: AggregateType
    aggregate_id: UUID
    version: int

    MAX_LENGTH: ClassVar[int] = 200
    MAX_VERSION: ClassVar[int] = 2**31 - 1  # the events table's integer column

    def encode(self) -> str:
        raw = json.dumps([self.aggregate_type.value, str(self.aggregate_id), self.version],
                         separators=(",", ":"))
        return "ct2." + base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> ConsistencyToken:
        """Strictly: three fields of exactly the types encode() writes (ct1 tokens,
        which also carried a position, are still read)."""
        try:
            if len(token) > cls.MAX_LENGTH:
                raise ValueError(f"longer than {cls.MAX_LENGTH} characters")
            prefix, _, body = token.partition(".")
            if prefix not in ("ct1", "ct2"):
                raise ValueError("unknown prefix")
            fields = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)),
                                parse_constant=_refuse_constant)
            if not isinstance(fields, list) or len(fields) != (4 if prefix == "ct1" else 3):
                raise ValueError("wrong number of fields")
            kind, aggregate_id, version = fields[:3]
            if not (isinstance(kind, str) and isinstance(aggregate_id, str)
                    and type(version) is int and 1 <= version <= cls.MAX_VERSION):
                raise ValueError("a field has the wrong type or range")
            return cls(AggregateType(kind), UUID(aggregate_id), version)
        except (ValueError, TypeError, RecursionError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"malformed consistency token ({exc}): send the value a command response "
                "returned, unchanged"
            ) from exc


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")

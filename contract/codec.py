"""Events as Kafka records: value, key and headers (W3C trace context included), and
back: a record's value decoded and upcast, or refused as non-retryable."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError

from contract.envelope import EventEnvelope
from contract.registry import REGISTRY, EventRegistry
from contract.topics import events_topic_name


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


def envelope_json(envelope: EventEnvelope) -> dict[str, Any]:
    """`envelope.model_dump(mode="json")`, written out: the append path builds one per
    event, and the generic serializer walked the payload and snapshot a second time
    for values that are already JSON. `payload` and `aggregate` must hold JSON
    values only, as decide and the snapshots make them (a unit test holds the two
    equal)."""
    meta = envelope.metadata
    return {
        "event_id": str(envelope.event_id),
        "event_type": envelope.event_type,
        "schema_version": envelope.schema_version,
        "aggregate_type": envelope.aggregate_type.value,
        "aggregate_id": str(envelope.aggregate_id),
        "version": envelope.version,
        "occurred_at": _json_datetime(envelope.occurred_at),
        "payload": envelope.payload,
        "aggregate": envelope.aggregate,
        "metadata": {
            "tenant_id": str(meta.tenant_id),
            "user_id": None if meta.user_id is None else str(meta.user_id),
            "correlation_id": str(meta.correlation_id),
            "causation_id": None if meta.causation_id is None else str(meta.causation_id),
            "trace_id": meta.trace_id,
            "is_reconstructed": meta.is_reconstructed,
        },
    }


def envelope_wire(envelope: EventEnvelope) -> bytes:
    """The record value as the outbox stores it and the relay sends it (ADR 0015):
    `envelope_json` in orjson's compact rendering."""
    return orjson.dumps(envelope_json(envelope))


def _json_datetime(value: datetime) -> str:
    """As pydantic writes an aware UTC datetime: ISO 8601 with `Z`."""
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


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

"""The contract, published: a JSON Schema per event type and an AsyncAPI 3 document of
every topic, generated from the same models the code uses (`contract.events`,
`contract.snapshots`, `contract.topics`). The query API serves the document at
`/asyncapi.json`; a test validates it against the AsyncAPI 3.0.0 schema and validates a
realistic history's events against the event schemas."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import TypeAdapter

from contract.envelope import AggregateType, EventEnvelope
from contract.events import EVENTS, NotificationCommand
from contract.registry import REGISTRY
from contract.snapshots import DefinitionSnapshot, UserSnapshot, WorkflowSnapshot
from contract.topics import (
    AUDIT_EVENTS,
    CONSUMER_GROUPS,
    DEFINITION_EVENTS,
    NOTIFICATION_COMMANDS,
    USER_EVENTS,
    WORKFLOW_EVENTS,
    Topic,
    dlq_topic,
)

SNAPSHOTS: dict[AggregateType, type] = {
    AggregateType.USER: UserSnapshot,
    AggregateType.DEFINITION: DefinitionSnapshot,
    AggregateType.WORKFLOW: WorkflowSnapshot,
}
KAFKA_BINDING = "0.5.0"
# Headers every event record carries (contract.codec.record_headers).
HEADERS: dict[str, str] = {
    "event_id": "the event's id (the idempotency key)",
    "event_type": "the event type; a consumer may skip an event it does not handle by it",
    "schema_version": "the payload's schema version",
    "aggregate_type": "workflow, definition or user",
    "aggregate_id": "the aggregate (also the record key)",
    "version": "the aggregate's version after this event",
    "tenant_id": "the tenant; aggregate ids are unique per tenant only",
    "correlation_id": "the request that caused it",
    "occurred_at": "when it was committed (ISO 8601, UTC)",
    "causation_id": "the command that caused it (optional)",
    "traceparent": "W3C trace context of the send (optional)",
}


def _schema(model: Any, title: str) -> dict[str, Any]:
    """A model's JSON Schema with its nested definitions under `$defs`."""
    schema = TypeAdapter(model).json_schema(ref_template="#/$defs/{model}")
    schema["title"] = title
    return schema


@functools.cache
def event_schemas() -> dict[str, dict[str, Any]]:
    """One JSON Schema (draft 2020-12) per event type: the whole envelope, its payload
    and its `aggregate` snapshot typed."""
    envelope = EventEnvelope.model_json_schema(ref_template="#/$defs/{model}")
    out = {}
    for name, (aggregate_type, model) in EVENTS.items():
        payload = _schema(model, f"{name} payload")
        snapshot = _schema(SNAPSHOTS[aggregate_type], f"{aggregate_type.value} snapshot")
        defs = {**envelope.get("$defs", {}), **payload.pop("$defs", {}),
                **snapshot.pop("$defs", {})}
        properties = dict(envelope["properties"])
        properties["event_type"] = {"const": name.value}
        properties["aggregate_type"] = {"const": aggregate_type.value}
        properties["schema_version"] = {"const": REGISTRY.get(name).schema_version}
        properties["payload"] = payload
        properties["aggregate"] = snapshot
        out[name.value] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://ringiflow.example/schemas/events/{name.value}.json",
            "title": name.value,
            "description": f"A {aggregate_type.value} event: {name.value}.",
            "type": "object", "properties": properties,
            "required": envelope["required"], "additionalProperties": False,
            "$defs": defs,
        }
    return out


def _channel_id(topic: Topic) -> str:
    return topic.name.replace(".", "-")


def _kafka_binding(topic: Topic) -> dict[str, Any]:
    return {"kafka": {
        "topic": topic.name, "partitions": topic.partitions, "replicas": 1,
        "topicConfiguration": {"cleanup.policy": topic.cleanup_policy.split(","),
                               "retention.ms": topic.retention_ms},
        "bindingVersion": KAFKA_BINDING}}


def _headers_schema() -> dict[str, Any]:
    return {"type": "object", "required": [h for h in HEADERS
                                           if h not in ("causation_id", "traceparent")],
            "properties": {h: {"type": "string", "description": d} for h, d in HEADERS.items()}}


def _key(description: str) -> dict[str, Any]:
    return {"kafka": {"key": {"type": "string", "description": description},
                      "bindingVersion": KAFKA_BINDING}}


@functools.cache
def asyncapi() -> dict[str, Any]:
    """Every topic RingiFlow writes: key, partitions, retention, headers and payloads."""
    schemas = event_schemas()
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for aggregate_type, topic in ((AggregateType.WORKFLOW, WORKFLOW_EVENTS),
                                  (AggregateType.DEFINITION, DEFINITION_EVENTS),
                                  (AggregateType.USER, USER_EVENTS)):
        channel = _channel_id(topic)
        names = [n for n, (kind, _) in EVENTS.items() if kind is aggregate_type]
        for name in names:
            messages[name.value] = {
                "name": name.value, "title": name.value, "contentType": "application/json",
                "headers": _headers_schema(), "payload": schemas[name.value],
                "bindings": _key("aggregate_id (UUID): every event of an aggregate lands on "
                                 "one partition, in version order (murmur2, as Java clients)")}
        channels[channel] = {
            "address": topic.name,
            "description": f"Every {aggregate_type.value} event, keyed by aggregate id.",
            "messages": {n.value: {"$ref": f"#/components/messages/{n.value}"} for n in names},
            "bindings": _kafka_binding(topic)}
        operations[f"publish-{channel}"] = {
            "action": "send", "channel": {"$ref": f"#/channels/{channel}"},
            "summary": "The relay publishes each committed event from the outbox.",
            "messages": [{"$ref": f"#/channels/{channel}/messages/{n.value}"} for n in names]}
    for topic, summary, key in (
            (AUDIT_EVENTS, "The audit processor's records, one per event.", "tenant_id"),
            (NOTIFICATION_COMMANDS, "Notifications to deliver, one per recipient.", "user_id")):
        channel, message = _channel_id(topic), topic.name.split(".")[1].capitalize() + "Record"
        payload = _schema(NotificationCommand, "notification command") \
            if topic is NOTIFICATION_COMMANDS else {"type": "object"}
        messages[message] = {"name": message, "contentType": "application/json",
                             "payload": payload, "bindings": _key(key)}
        channels[channel] = {"address": topic.name, "description": summary,
                             "messages": {message: {"$ref": f"#/components/messages/{message}"}},
                             "bindings": _kafka_binding(topic)}
        operations[f"publish-{channel}"] = {
            "action": "send", "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}]}
    for group in CONSUMER_GROUPS:
        topic = dlq_topic(group)
        channel = _channel_id(topic)
        channels[channel] = {
            "address": topic.name,
            "description": f"{group}'s dead letters: the original record, its headers, and "
                           "dlq.* headers naming the error, the attempts and what it waits "
                           "behind.",
            "messages": {"DeadLetter": {"$ref": "#/components/messages/DeadLetter"}},
            "bindings": _kafka_binding(topic)}
    messages["DeadLetter"] = {"name": "DeadLetter", "contentType": "application/json",
                              "payload": {"description": "the original record's value"},
                              "bindings": _key("the original key (aggregate id)")}
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "RingiFlow events", "version": "1",
                 "description": "The topics of RingiFlow's event-sourced approval "
                                "workflows: what each carries and how it is keyed."},
        "defaultContentType": "application/json",
        "channels": channels, "operations": operations,
        "components": {"messages": messages},
    }

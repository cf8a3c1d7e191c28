"""The RingiFlow event contract: envelope, event types and their payloads, aggregate
snapshots, registry with upcasting, Kafka record codec, topic catalogue, consistency
tokens, and their publication as JSON Schema and AsyncAPI.

The one place every component agrees on. It imports none of them (only the standard
library and pydantic), so producers and consumers depend on it, not on each other.
Everything is importable from `contract` itself; the modules say where it lives."""

from contract.codec import (
    KafkaRecord,
    UndecodableRecord,
    decode_envelope,
    encode_envelope,
    envelope_json,
    envelope_wire,
    new_trace_id,
    parse_traceparent,
    record_headers,
    to_record,
    traceparent,
)
from contract.consistency import (
    APPLIED_NOTIFY_CHANNEL,
    NOTIFY_PAYLOAD_MAX,
    Applied,
    ConsistencyToken,
    applied_payloads,
    parse_applied,
)
from contract.envelope import (
    TERMINAL_STATUSES,
    AggregateType,
    Decision,
    EventEnvelope,
    EventMetadata,
    Priority,
    StepStatus,
    WorkflowStatus,
    utcnow,
)
from contract.events import EVENTS, EventName, NotificationCommand, names_of
from contract.registry import (
    REGISTRY,
    EventRegistry,
    EventType,
    UnknownEventType,
    UnsupportedSchemaVersion,
    Upcaster,
    stored_envelope,
)
from contract.snapshots import (
    CommentSnapshot,
    DefinitionSnapshot,
    DocumentFields,
    DocumentSnapshot,
    Snapshot,
    StepSnapshot,
    StepTemplateSnapshot,
    UserSnapshot,
    WorkflowSnapshot,
    definition_of,
    user_of,
    workflow_of,
)
from contract.topics import (
    AUDIT_EVENTS,
    CONSUMER_GROUPS,
    DAY_MS,
    DEFINITION_EVENTS,
    NOTIFICATION_COMMANDS,
    OUTBOX_NOTIFY_CHANNEL,
    TOPICS,
    USER_EVENTS,
    WORKFLOW_EVENTS,
    Topic,
    all_topics,
    dlq_topic,
    events_topic_name,
)

__all__ = [
    "APPLIED_NOTIFY_CHANNEL", "AUDIT_EVENTS", "CONSUMER_GROUPS", "DAY_MS", "DEFINITION_EVENTS",
    "EVENTS", "NOTIFICATION_COMMANDS", "NOTIFY_PAYLOAD_MAX", "OUTBOX_NOTIFY_CHANNEL", "REGISTRY",
    "TERMINAL_STATUSES", "TOPICS", "USER_EVENTS", "WORKFLOW_EVENTS", "AggregateType", "Applied",
    "CommentSnapshot",
    "ConsistencyToken", "Decision", "DefinitionSnapshot", "DocumentFields",
    "DocumentSnapshot", "EventEnvelope", "EventMetadata", "EventName", "EventRegistry",
    "EventType", "KafkaRecord", "NotificationCommand", "Priority", "Snapshot", "StepSnapshot",
    "StepStatus",
    "StepTemplateSnapshot", "Topic", "UndecodableRecord", "UnknownEventType",
    "UnsupportedSchemaVersion", "Upcaster", "UserSnapshot", "WorkflowSnapshot",
    "WorkflowStatus", "all_topics", "applied_payloads", "decode_envelope", "definition_of",
    "dlq_topic", "encode_envelope",
    "envelope_json", "envelope_wire", "events_topic_name", "names_of", "new_trace_id",
    "parse_applied", "parse_traceparent", "record_headers", "stored_envelope", "to_record",
    "traceparent", "user_of", "utcnow", "workflow_of",
]

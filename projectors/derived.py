"""The stream processors: audit and notification records derived from events
onto their own topics.

Delivery is at-least-once, so every derived record carries a deterministic id
(from the event id) that its consumers deduplicate on. Notifications are side
effects: during a replay they are suppressed unless the operator asks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from uuid import NAMESPACE_URL, uuid5

import orjson
from confluent_kafka import KafkaException
from opentelemetry.trace import Status, StatusCode

from contract import AUDIT_EVENTS, NOTIFICATION_COMMANDS, EventName, workflow_of
from infra import tracing
from infra.kafka import producer
from infra.tracing import SpanKind
from projectors.projection import Delivery, Retryable, Unavailable

Derived = tuple[str, bytes, bytes, list[tuple[str, bytes]]]  # topic, key, value, headers


def audit_records(delivery: Delivery) -> list[Derived]:
    e = delivery.envelope
    record = {
        "audit_id": str(e.event_id), "tenant_id": str(e.tenant_id),
        "occurred_at": e.occurred_at.isoformat(), "actor_id": str(e.metadata.user_id or ""),
        "actor_name": e.payload.get("actor_name"), "action": e.event_type,
        "aggregate_type": e.aggregate_type.value, "aggregate_id": str(e.aggregate_id),
        "version": e.version, "correlation_id": str(e.metadata.correlation_id),
        "replay": delivery.replay,
    }
    return [(AUDIT_EVENTS.name, str(e.tenant_id).encode(), orjson.dumps(record),
             headers(delivery, record["audit_id"]))]


def notification_records(delivery: Delivery) -> list[Derived]:
    e = delivery.envelope
    snapshot, payload = workflow_of(e), e.payload
    wanted: list[tuple[str, str]] = []  # (recipient, kind)
    if e.event_type == EventName.WORKFLOW_STEP_ASSIGNED:
        wanted.append((payload["assignee_id"], "ApprovalRequested"))
    elif e.event_type in (EventName.WORKFLOW_APPROVED, EventName.WORKFLOW_REJECTED):
        wanted.append((snapshot["initiator_id"], e.event_type))
    elif e.event_type == EventName.WORKFLOW_STEP_COMPLETED and \
            payload.get("decision") == "changes_requested":
        wanted.append((snapshot["initiator_id"], "ChangesRequested"))
    out = []
    for recipient, kind in wanted:
        notification_id = str(uuid5(NAMESPACE_URL, f"ringiflow:{e.event_id}:{recipient}"))
        command = {
            "notification_id": notification_id, "type": kind, "user_id": recipient,
            "tenant_id": str(e.tenant_id), "workflow_id": str(e.aggregate_id),
            "title": snapshot.get("title"), "step_name": payload.get("step_name"),
            "comment": payload.get("comment"), "due_date": snapshot.get("due_date"),
            "caused_by": str(e.event_id),
        }
        out.append((NOTIFICATION_COMMANDS.name, recipient.encode(), orjson.dumps(command),
                    headers(delivery, notification_id)))
    return out


def headers(delivery: Delivery, record_id: str) -> list[tuple[str, bytes]]:
    e = delivery.envelope
    out = [("record_id", record_id.encode()), ("caused_by", str(e.event_id).encode()),
           ("tenant_id", str(e.tenant_id).encode()),
           ("correlation_id", str(e.metadata.correlation_id).encode())]
    if delivery.replay:
        out.append(("ringiflow-replay", b"true"))
    return out


class DerivedTopicStore:
    """A 'store' whose writes are records on a derived topic."""

    def __init__(self, bootstrap: str, derive: Callable[[Delivery], list[Derived]],
                 side_effect: bool, on_replay: bool = False) -> None:
        self.producer = producer(bootstrap)
        self.derive = derive
        self.quiet_on_replay = side_effect and not on_replay

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self.producer.flush(10)

    async def apply(self, batch: Sequence[Delivery]) -> None:
        errors: list[Any] = []
        spans = []
        for delivery in batch:
            if delivery.replay and self.quiet_on_replay:
                continue
            for topic, key, value, hdrs in self.derive(delivery):
                if tracing.enabled():  # the derived record carries the trace on
                    span = tracing.tracer.start_span(
                        f"send {topic}", kind=SpanKind.PRODUCER,
                        attributes=tracing.kafka_attributes(
                            topic, "send", **{"messaging.kafka.message.key": key.decode(),
                                              "ringiflow.caused_by": str(
                                                  delivery.envelope.event_id)}))
                    spans.append(span)
                    hdrs = tracing.with_traceparent(hdrs, span.get_span_context())
                try:
                    self.producer.produce(topic, value, key, headers=hdrs, on_delivery=lambda
                                          err, _m: errors.append(err) if err else None)
                except BufferError:
                    self.producer.poll(0.5)
                    raise Retryable("producer queue full") from None
                except KafkaException as exc:
                    raise Retryable(f"produce failed: {exc}") from exc
        unsent = self.producer.flush(30)
        for span in spans:
            if unsent or errors:
                span.set_status(Status(StatusCode.ERROR, "not acknowledged"))
            span.end()
        if unsent or errors:
            raise Unavailable(f"derived records not acknowledged: {errors[:3]}")

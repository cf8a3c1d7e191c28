"""Producing a batch of outbox rows to Kafka and learning, row by row, what the
broker acknowledged. Runs in a worker thread: confluent-kafka blocks."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from opentelemetry.trace import Span, Status, StatusCode

from infra import tracing
from infra.kafka import producer_config
from infra.tracing import SpanKind

# Errors that retrying the same bytes cannot fix; after max attempts the row is
# marked failed. Everything else (timeouts, broker down, leader moves) is
# transient: the row waits and is retried for as long as it takes.
PERMANENT = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD, KafkaError.INVALID_MSG,
    KafkaError.INVALID_MSG_SIZE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError._INVALID_ARG,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
})
DISTURBANCES = frozenset({KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
                          KafkaError._UNKNOWN_PARTITION, KafkaError.UNKNOWN_PRODUCER_ID,
                          KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER})
MISSING_TOPIC = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC})


class Row(NamedTuple):  # a tuple: built for every row of every batch
    id: int
    tenant_id: str  # as text: ids here are only compared, and the key is the text
    aggregate_id: str
    lane: int
    version: int
    topic: str
    value: bytes
    headers: dict[str, str]  # as stored; the producer encodes str values
    created_at: float  # epoch seconds

    @property
    def stream(self) -> tuple[str, str]:
        """A stream is one tenant's aggregate: ids are unique per tenant only."""
        return self.tenant_id, self.aggregate_id


@dataclass
class Outcome:
    acked_at: dict[int, float] = field(default_factory=dict)  # row id -> ack time
    errors: dict[int, tuple[str, bool]] = field(default_factory=dict)  # row id -> (why, permanent)
    # row id -> (partition, offset) of each acknowledged row
    offsets: dict[int, tuple[int, int]] = field(default_factory=dict)
    missing_topic: bool = False
    fatal: str | None = None  # the producer is unusable and must be replaced

    def acknowledged_all(self, rows: list[Row]) -> bool:
        return not self.errors and self.fatal is None and \
            all(row.id in self.acked_at for row in rows)


def send_span(row: Row) -> Span:
    """`send <topic>`, continuing the context the command stored with the row."""
    return tracing.tracer.start_span(
        f"send {row.topic}", context=tracing.context_from(row.headers.get("traceparent")),
        kind=SpanKind.PRODUCER, attributes=tracing.kafka_attributes(
            row.topic, "send", **{"messaging.kafka.message.key": row.aggregate_id,
                                  "messaging.message.id": row.headers.get("event_id", ""),
                                  "ringiflow.version": row.version}))


def ended(span: Span, err: KafkaError | None, msg: Message | None) -> None:
    if err is not None:
        span.set_status(Status(StatusCode.ERROR, f"{err.name()}: {err.str()}"))
    elif msg is not None:
        span.set_attribute("messaging.destination.partition.id", str(msg.partition()))
        span.set_attribute("messaging.kafka.offset", msg.offset())
    span.end()


class Publisher:
    def __init__(self, bootstrap: str, message_timeout_ms: int) -> None:
        self.producer = Producer(producer_config(
            bootstrap,
            **{"message.timeout.ms": message_timeout_ms, "linger.ms": 2,
               "batch.num.messages": 10_000, "queue.buffering.max.messages": 200_000,
               "max.in.flight.requests.per.connection": 5, "error_cb": self._error},
        ))
        # Set when the connection to the broker broke: the broker may have come
        # back empty, so the relay checks what it still holds before going on.
        self.disturbed = threading.Event()
        self.flush_timeout_s = message_timeout_ms / 1000 + 5

    def publish(self, rows: list[Row]) -> Outcome:
        """Produce rows in order; per aggregate, stop at the first row that cannot
        even be queued, so no later version overtakes it."""
        outcome = Outcome()
        stopped: set[tuple[str, str]] = set()
        spans: dict[int, Span] = {}

        def delivered(row_id: int, err: KafkaError | None, msg: Message) -> None:
            if (span := spans.pop(row_id, None)) is not None:
                ended(span, err, msg)
            if err is None:
                outcome.acked_at[row_id] = time.time()
                outcome.offsets[row_id] = (msg.partition(), msg.offset())
                return
            outcome.errors[row_id] = (f"{err.name()}: {err.str()}", err.code() in PERMANENT)
            if err.code() in MISSING_TOPIC:
                outcome.missing_topic = True
            if err.fatal():
                outcome.fatal = err.str()

        for row in rows:
            if row.stream in stopped:
                continue
            headers = row.headers
            if tracing.enabled():
                spans[row.id] = span = send_span(row)
                headers = {**headers, "traceparent": tracing.traceparent_of(
                    span.get_span_context())}  # the send span's, in place of the append's
            while True:
                try:
                    self.producer.produce(
                        row.topic, value=row.value, key=row.aggregate_id.encode(),
                        headers=headers,
                        on_delivery=lambda err, msg, rid=row.id: delivered(rid, err, msg))
                    break
                except BufferError:  # local queue full: let deliveries drain it
                    self.producer.poll(0.05)
                except KafkaException as exc:
                    error = exc.args[0]
                    if (span := spans.pop(row.id, None)) is not None:
                        ended(span, error, None)
                    outcome.errors[row.id] = (f"{error.name()}: {error.str()}",
                                              error.code() in PERMANENT)
                    stopped.add(row.stream)
                    if error.fatal():
                        outcome.fatal = error.str()
                        return outcome
                    break
        # Every queued message ends in a delivery report within message.timeout.ms.
        try:
            self.producer.flush(self.flush_timeout_s)
        except KafkaException as exc:
            # e.g. the broker lost the idempotent producer's state (it restarted
            # empty): librdkafka refuses to go on rather than risk reordering.
            outcome.fatal = exc.args[0].str()
        for span in spans.values():  # no delivery report came: not known to be sent
            span.set_status(Status(StatusCode.ERROR, "no delivery report"))
            span.end()
        return outcome

    def _error(self, error: KafkaError) -> None:
        if error.code() in DISTURBANCES or error.fatal():
            self.disturbed.set()

    def serve_callbacks(self) -> None:
        self.producer.poll(0)

    def discard_queued(self) -> None:
        """After losing the database session (and so the lanes), nothing queued
        may still go out: another relay may own those aggregates now."""
        self.producer.purge(in_queue=True, in_flight=False)
        self.producer.poll(0)

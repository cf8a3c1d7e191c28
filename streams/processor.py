"""Running one projection over batches of records, whatever consumes them.

Per batch: decode (undecodable, unknown type or schema version -> DLQ at once),
keep the event types the projection handles, park events of aggregates that
wait behind a dead letter, and apply the rest to the store. Retryable errors
are retried with bounded exponential backoff -- for as long as it takes when
the store itself is unreachable -- and a batch that fails for good is split
until the events that fail are isolated, dead-lettered and their aggregates
parked, while every other event is applied. Only then does the batch count as
processed, so the consumer may commit its offsets. Retrying and tracing the store's
writes are wrappers (streams.wrappers)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from uuid import UUID

from prometheus_client import Counter, Gauge, Histogram

import contract
from infra.telemetry import HOP_BUCKETS, observe_many
from projectors.projection import Delivery, NonRetryable, Projection, Retryable
from streams.deadletters import AnyRecord, DeadLetters, Failure, header
from streams.wrappers import Retrying, RetryPolicy, Traced

log = logging.getLogger("ringiflow.streams")

PROCESSED = Counter("ringiflow_events_processed_total", "Events applied", ["group"])
SKIPPED = Counter("ringiflow_events_skipped_total", "Events this projection ignores", ["group"])
FAILED = Counter("ringiflow_events_failed_total", "Events dead-lettered", ["group", "reason"])
PARKED = Gauge("ringiflow_parked_aggregates", "Aggregates waiting behind a dead letter",
               ["group"])
PARKED_OVER_CAP = Gauge("ringiflow_parked_over_cap",
                        "1 when more aggregates are parked than the cap allows", ["group"])
EVENT_AGE = Gauge("ringiflow_event_age_seconds",
                  "Now minus occurred_at of the last event applied", ["group", "partition"])

AGE_AT_APPLY = Histogram("ringiflow_event_age_at_apply_seconds",
                         "occurred_at (the command's commit) to applied in this read model",
                         ["group"], buckets=HOP_BUCKETS)

REPLAY_HEADER = "ringiflow-replay"


@dataclass
class Processor:
    projection: Projection
    dead_letters: DeadLetters
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    parked_cap: int = 1000
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        # Retried and traced around the projection's own store (streams.wrappers).
        self.store = Retrying(Traced(self.projection.store, self.group), self.group,
                              self.policy, self.stop)

    @property
    def group(self) -> str:
        return self.projection.group

    @property
    def topics(self) -> tuple[str, ...]:
        return self.projection.topics

    async def start(self) -> None:
        await self.projection.store.start()

    async def process(self, records: Sequence[AnyRecord]) -> list[Delivery]:
        """Apply or dead-letter every record; the deliveries that were applied."""
        now = datetime.now(UTC)
        dead: list[Failure] = []
        deliveries: list[tuple[AnyRecord, Delivery]] = []
        skipped = 0
        handles = self.projection.handles
        for record in records:
            named, replay = None, False
            for key, value in record.headers:
                if key == "event_type":
                    named = value
                elif key == REPLAY_HEADER:
                    replay = value == b"true"
            # The event_type header says whether this projection wants the event at all:
            # one it does not handle is skipped undecoded (a projection that does handle
            # it dead-letters it if it is broken).
            if named is not None and not handles(named.decode(errors="replace")):
                skipped += 1
                continue
            try:
                envelope = contract.decode_envelope(record.value)
            except (contract.UndecodableRecord, contract.UnknownEventType,
                    contract.UnsupportedSchemaVersion) as exc:
                dead.append(failure_from_headers(record, exc, now))
                continue
            if not handles(envelope.event_type):
                skipped += 1
                continue
            deliveries.append((record, Delivery(envelope, replay)))
        if skipped:
            SKIPPED.labels(self.group).inc(skipped)
        waiting = {f.stream for f in dead if f.stream}
        parked = await self.dead_letters.parked({stream_of(d) for _, d in deliveries})
        flowing: list[tuple[AnyRecord, Delivery]] = []
        for record, delivery in deliveries:
            stream = stream_of(delivery)
            behind = parked.get(stream) or next(
                (f.event_id for f in dead if f.stream == stream), None)
            if stream in parked or stream in waiting:
                dead.append(parked_failure(record, delivery, behind, now))
            else:
                flowing.append((record, delivery))
        dead += await self._apply(flowing)
        if dead:
            await self.dead_letters.send(dead)
            for failure in dead:
                FAILED.labels(self.group, failure.reason).inc()
            await self._check_cap()
        applied_at = time.time()
        failed = {id(f.record) for f in dead}
        applied = [(r, d) for r, d in flowing if id(r) not in failed]
        newest: dict[int, float] = {}  # partition -> age of its last applied event
        ages = []
        for record, delivery in applied:
            age = applied_at - delivery.envelope.occurred_at.timestamp()
            newest[record.partition] = age
            if not delivery.replay:  # a rebuild's age says nothing about freshness
                ages.append(max(age, 0.0))
        observe_many(AGE_AT_APPLY.labels(self.group), ages)
        for partition, age in newest.items():
            EVENT_AGE.labels(self.group, str(partition)).set(age)
        return [d for _, d in applied]

    async def _apply(self, items: list[tuple[AnyRecord, Delivery]]) -> list[Failure]:
        """Apply the batch; on a lasting failure split it to find the culprits.
        Events after a failed one of the same aggregate are parked behind it."""
        if not items:
            return []
        first = datetime.now(UTC)
        try:
            await self.store.apply([d for _, d in items])
            PROCESSED.labels(self.group).inc(len(items))
            return []
        except (NonRetryable, Retryable) as exc:
            if len(items) == 1:
                record, delivery = items[0]
                attempts = 1 if isinstance(exc, NonRetryable) else self.policy.attempts
                return [failure_of(record, delivery, exc, attempts, first)]
        failures: list[Failure] = []
        for record, delivery in items:  # one by one, in order
            behind = next((f.event_id for f in failures
                           if f.stream == stream_of(delivery)), None)
            if behind:
                failures.append(parked_failure(record, delivery, behind, first))
                continue
            failures += await self._apply([(record, delivery)])
        return failures

    async def _check_cap(self) -> None:
        count = await self.dead_letters.count()
        PARKED.labels(self.group).set(count)
        over = count > self.parked_cap
        PARKED_OVER_CAP.labels(self.group).set(int(over))
        if over:
            log.critical("%s: %d aggregates are parked behind dead letters (cap %d): the "
                         "group keeps flowing for every other aggregate, but this needs an "
                         "operator: `ringiflow dlq list --group %s`", self.group, count,
                         self.parked_cap, self.group)


def stream_of(delivery: Delivery) -> tuple[UUID, UUID]:
    """Aggregate ids are unique per tenant only: a stream is (tenant, aggregate)."""
    return delivery.envelope.tenant_id, delivery.envelope.aggregate_id


def failure_of(record: AnyRecord, delivery: Delivery, error: BaseException, attempts: int,
               first: datetime) -> Failure:
    e = delivery.envelope
    return Failure(record, error, attempts, first, datetime.now(UTC), e.aggregate_id,
                   e.tenant_id, e.aggregate_type.value, e.version, e.event_id)


def parked_failure(record: AnyRecord, delivery: Delivery, behind: UUID | None,
                   now: datetime) -> Failure:
    e = delivery.envelope
    error = NonRetryable(f"parked behind dead letter {behind} of aggregate {e.aggregate_id}")
    return Failure(record, error, 0, now, now, e.aggregate_id, e.tenant_id,
                   e.aggregate_type.value, e.version, e.event_id,
                   parked_behind=behind or e.event_id)


def failure_from_headers(record: AnyRecord, error: BaseException, now: datetime) -> Failure:
    """An event the consumer cannot read still names its aggregate in the headers,
    so its successors can be parked behind it."""
    def uuid_header(name: str) -> UUID | None:
        try:
            value = header(record, name)
            return UUID(value) if value else None
        except ValueError:
            return None

    version = header(record, "version")
    aggregate, tenant, event = (uuid_header("aggregate_id"), uuid_header("tenant_id"),
                                uuid_header("event_id"))
    if not (aggregate and tenant and event):
        aggregate = None  # nothing to park behind: only this record goes to the DLQ
    return Failure(record, error, 1, now, now, aggregate, tenant,
                   header(record, "aggregate_type"),
                   int(version) if version and version.isdigit() else None, event)

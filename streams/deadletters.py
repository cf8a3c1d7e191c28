"""The sequenced dead-letter queue: a group's DLQ topic holds the records, and
streams.parked_aggregates says which aggregates wait behind a dead letter.

Once an event of an aggregate is dead-lettered, every later event of that
aggregate is parked behind it (also sent to the DLQ, in order) while other
aggregates keep flowing. Re-driving replays the parked sequence in order.

A worker keeps its group's parked set between batches while it listens for changes
to the table (`DeadLetters.watch`, migration 0015); without that, every batch reads it."""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar
from uuid import UUID

import psycopg
from confluent_kafka import KafkaException
from prometheus_client import Counter
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from contract import dlq_topic
from infra import tracing
from infra.kafka import producer
from infra.retry import Backoff, retry
from infra.tracing import SpanKind
from projectors.projection import Store

log = logging.getLogger("ringiflow.dlq")
T = TypeVar("T")

# Up to this many parked aggregates of a group are read whole per batch (and kept).
PARKED_READ_WHOLE = 200
# Sent by a trigger on every change to streams.parked_aggregates (migration 0015).
PARKED_NOTIFY_CHANNEL = "ringiflow_parked"
# A kept parked set is read again after this long even if no change was heard: the
# bound on staleness should a LISTEN connection die without an error.
# Default of the setting worker_parked_keep_s.
KEEP_PARKED_S = 5.0

PARKED_READS = Counter("ringiflow_parked_set_reads_total",
                       "Reads of the group's parked aggregates from PostgreSQL (ADR 0019: "
                       "batches share one while the worker listens for changes)", ["group"])

SESSION_LOST = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


SESSION_BACKOFF = Backoff(0.1, 5.0)


async def until_reachable(what: str, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work`, again and again while PostgreSQL cannot be reached or drops the
    session (restart, pg_terminate_backend, failover): a store outage, to be
    waited out, never a reason for the worker to exit. Cancellation (shutdown)
    ends the wait."""
    return await retry(work, retry_on=SESSION_LOST, backoff=SESSION_BACKOFF,
                       what=f"{what} (PostgreSQL session lost)", log=log)


class AnyRecord(Protocol):
    """A consumed Kafka record, whatever library consumed it: aiokafka's ConsumerRecord
    as the worker receives it (not copied), or a :class:`Record`."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes | None]]: ...


def header(record: AnyRecord, name: str) -> str | None:
    """The first header of that name, decoded; None when absent or null."""
    for key, value in record.headers:
        if key == name:
            return None if value is None else value.decode(errors="replace")
    return None


@dataclass(frozen=True)
class Record:
    """A record made by hand (a re-drive, a test), in the shape consumers deliver."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    def header(self, name: str) -> str | None:
        return header(self, name)


@dataclass(frozen=True)
class Failure:
    record: AnyRecord
    error: BaseException
    attempts: int
    first_failure: datetime
    last_failure: datetime
    aggregate_id: UUID | None = None
    tenant_id: UUID | None = None
    aggregate_type: str | None = None
    version: int | None = None
    event_id: UUID | None = None
    parked_behind: UUID | None = None  # set when parked behind an earlier dead letter

    @property
    def stream(self) -> tuple[UUID, UUID] | None:
        """The (tenant, aggregate) this record holds back, if it names one."""
        if self.aggregate_id is None or self.tenant_id is None:
            return None
        return self.tenant_id, self.aggregate_id

    @property
    def reason(self) -> str:
        return "parked" if self.parked_behind else "failed"


def dlq_headers(group: str, failure: Failure) -> list[tuple[str, bytes]]:
    error = failure.error
    context = {
        "dlq.reason": failure.reason,
        "dlq.group": group,
        "dlq.original.topic": failure.record.topic,
        "dlq.original.partition": str(failure.record.partition),
        "dlq.original.offset": str(failure.record.offset),
        "dlq.error.class": type(error).__name__,
        "dlq.error.message": str(error)[:4000],
        "dlq.error.stack": "".join(traceback.format_exception(error))[-8000:],
        "dlq.attempts": str(failure.attempts),
        "dlq.first_failure": failure.first_failure.isoformat(),
        "dlq.last_failure": failure.last_failure.isoformat(),
    }
    if failure.parked_behind:
        context["dlq.parked_behind"] = str(failure.parked_behind)
    original = [(k, v) for k, v in failure.record.headers if not k.startswith("dlq.")]
    return original + [(k, v.encode()) for k, v in context.items()]


class DeadLetters:
    def __init__(self, group: str, bootstrap: str, pool: AsyncConnectionPool,
                 keep_s: float = KEEP_PARKED_S) -> None:
        self.group = group
        self.keep_s = keep_s
        self.topic = dlq_topic(group).name
        self.producer = producer(bootstrap)
        self.pool = pool
        # The group's whole parked set, kept while `watch` listens (None: read it).
        self.kept: dict[tuple[UUID, UUID], UUID] | None = None
        self.kept_until = 0.0
        self.changes = 0  # every change heard of, and every forget()
        self.listening = False
        self.reads = 0  # of the parked set from PostgreSQL
        self.read_counter = PARKED_READS.labels(group)

    def forget(self) -> None:
        """Drop the kept parked set: the next batch reads it again. After this process
        parked events, after a change heard of, and when partitions move."""
        self.kept = None
        self.changes += 1

    async def watch(self, url: str) -> None:
        """LISTEN for changes to the parked set, so that batches may share one read of
        it; until cancelled. While the connection is down every batch reads it."""
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {PARKED_NOTIFY_CHANNEL}")
                    self.listening = True
                    self.forget()  # whatever changed while nobody listened
                    async for _note in conn.notifies():
                        self.forget()
            except psycopg.Error as exc:
                log.warning("%s: LISTEN %s failed (%s); reading the parked set every batch "
                            "until it is back", self.group, PARKED_NOTIFY_CHANNEL, exc)
            finally:
                self.listening = False
                self.forget()
            await asyncio.sleep(1)

    async def parked(self, streams: set[tuple[UUID, UUID]]) -> dict[tuple[UUID, UUID], UUID]:
        """Which of these (tenant, aggregate) streams wait behind a dead letter
        (-> its event id)."""
        if not streams:
            return {}
        kept = self.kept
        if kept is not None and time.monotonic() < self.kept_until:
            return {s: kept[s] for s in streams if s in kept} if kept else {}
        changes = self.changes

        async def read() -> dict[tuple[UUID, UUID], UUID]:
            self.reads += 1
            self.read_counter.inc()
            async with self.pool.connection() as conn:
                # Usually few or none are parked: read them all, rather than send the
                # batch's streams (adapting ~1,000 UUIDs costs more than the query).
                cur = await conn.execute(
                    "SELECT tenant_id, aggregate_id, first_event_id "
                    "FROM streams.parked_aggregates WHERE consumer_group = %s LIMIT %s",
                    (self.group, PARKED_READ_WHOLE + 1))
                rows = await cur.fetchall()
                if len(rows) <= PARKED_READ_WHOLE:
                    whole = {(t, a): event for t, a, event in rows}
                    # Kept only if the LISTEN stood from before this read to after it
                    # with nothing heard meanwhile: a later change will be heard.
                    if self.listening and changes == self.changes:
                        self.kept, self.kept_until = whole, time.monotonic() + self.keep_s
                    return {s: event for s, event in whole.items() if s in streams}
                cur = await conn.execute(
                    "SELECT p.tenant_id, p.aggregate_id, p.first_event_id "
                    "FROM streams.parked_aggregates p "
                    "JOIN unnest(%s::uuid[], %s::uuid[]) AS s(tenant, id) "
                    "ON p.tenant_id = s.tenant AND p.aggregate_id = s.id "
                    "WHERE p.consumer_group = %s",
                    ([t for t, _ in streams], [a for _, a in streams], self.group))
                return {(t, a): event for t, a, event in await cur.fetchall()}

        return await until_reachable(f"{self.group} parked aggregates", read)

    async def count(self) -> int:
        async def read() -> int:
            async with self.pool.connection() as conn:
                cur = await conn.execute("SELECT count(*) FROM streams.parked_aggregates "
                                         "WHERE consumer_group = %s", (self.group,))
                row = await cur.fetchone()
                return int(row[0]) if row else 0

        return await until_reachable(f"{self.group} parked count", read)

    async def send(self, failures: Sequence[Failure]) -> None:
        """Write the records to the DLQ topic (acknowledged before returning: the
        event must live somewhere before its offset may be committed), then
        record the parking."""
        if not failures:
            return
        errors: list[str] = []
        for failure in failures:
            key = failure.record.key or (str(failure.aggregate_id).encode()
                                         if failure.aggregate_id else None)
            self.producer.produce(
                self.topic, value=failure.record.value, key=key,
                headers=dlq_headers(self.group, failure),
                on_delivery=lambda err, _msg: errors.append(str(err)) if err else None)
        remaining = self.producer.flush(30)
        if remaining or errors:
            raise KafkaException(f"DLQ {self.topic} did not acknowledge: {errors[:3]}")
        # An upsert: a retry after a commit whose answer was lost at worst counts twice.
        async def park() -> None:
            async with self.pool.connection() as conn, conn.transaction():
                for failure in failures:
                    if failure.stream is not None:
                        await self._park(conn, failure)

        await until_reachable(f"{self.group} parking", park)
        self.forget()  # the next batch must see these parked, not wait for the NOTIFY
        for failure in failures:
            log.error("%s %s event %s (%s v%s, from %s[%d]@%d) to %s: %s: %s", self.group,
                      failure.reason, failure.event_id, failure.aggregate_type,
                      failure.version, failure.record.topic, failure.record.partition,
                      failure.record.offset, self.topic, type(failure.error).__name__,
                      failure.error)

    async def _park(self, conn: AsyncConnection, failure: Failure) -> None:
        await conn.execute(
            "INSERT INTO streams.parked_aggregates AS p (consumer_group, aggregate_id, "
            "tenant_id, aggregate_type, first_event_id, first_version, last_version, "
            "error_class, error_message) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (consumer_group, tenant_id, aggregate_id) DO UPDATE SET "
            "parked_events = p.parked_events + 1, "
            "last_version = greatest(p.last_version, EXCLUDED.last_version), "
            "updated_at = clock_timestamp()",
            (self.group, failure.aggregate_id, failure.tenant_id,
             failure.aggregate_type or "unknown", failure.event_id, failure.version or 0,
             failure.version or 0, type(failure.error).__name__, str(failure.error)[:2000]))

    def close(self) -> None:
        self.producer.flush(10)


@dataclass(frozen=True)
class Redrive:
    aggregate_id: UUID
    applied: int
    released: bool
    error: str | None = None


async def redrive(dead_letters: DeadLetters, store: Store, tenant_id: UUID, aggregate_id: UUID,
                  bootstrap: str) -> Redrive:
    """Replay a tenant's aggregate's dead letters, in order, through the store;
    release the aggregate when all of them applied and nothing was parked meanwhile."""
    from aiokafka.partitioner import DefaultPartitioner

    from contract import decode_envelope
    from infra.kafka import partitions_of, read_from_start
    from projectors.projection import Delivery

    applied = 0
    while True:
        async with dead_letters.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT first_version, parked_events FROM streams.parked_aggregates "
                "WHERE consumer_group = %s AND tenant_id = %s AND aggregate_id = %s",
                (dead_letters.group, tenant_id, aggregate_id))
            row = await cur.fetchone()
        if row is None:
            return Redrive(aggregate_id, applied, released=True)
        first_version, parked_events = row
        key = str(aggregate_id).encode()
        numbers = sorted(await partitions_of(bootstrap, dead_letters.topic))
        partition = DefaultPartitioner()(key, numbers, numbers)  # where the key's records are
        letters = [(decode_envelope(m.value), _header(m, "traceparent"))
                   for m in await read_from_start(bootstrap, dead_letters.topic, [partition])
                   if m.key == key and _header(m, "tenant_id") == str(tenant_id)]
        letters = [(e, parent) for e, parent in letters if e.version >= first_version]
        for envelope, parent in sorted(letters, key=lambda letter: letter[0].version):
            try:
                # The dead letter kept the send span's traceparent: the re-drive
                # continues the trace of the command that wrote the event.
                with tracing.tracer.start_as_current_span(
                        f"process {dead_letters.topic}", kind=SpanKind.CONSUMER,
                        context=tracing.context_from(parent), links=tracing.links_to([parent]),
                        attributes=tracing.kafka_attributes(
                            dead_letters.topic, "process", **{
                                "messaging.consumer.group.name": dead_letters.group,
                                "messaging.kafka.message.key": str(aggregate_id),
                                "ringiflow.redrive": True, "ringiflow.version": envelope.version})):
                    await store.apply([Delivery(envelope)])
            except Exception as exc:  # still failing: stays parked, with the new reason
                async with dead_letters.pool.connection() as conn:
                    await conn.execute(
                        "UPDATE streams.parked_aggregates SET error_class = %s, "
                        "error_message = %s, updated_at = clock_timestamp() "
                        "WHERE consumer_group = %s AND tenant_id = %s AND aggregate_id = %s",
                        (type(exc).__name__, str(exc)[:2000], dead_letters.group,
                         tenant_id, aggregate_id))
                return Redrive(aggregate_id, applied, released=False,
                               error=f"v{envelope.version}: {type(exc).__name__}: {exc}")
            applied += 1
        async with dead_letters.pool.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM streams.parked_aggregates WHERE consumer_group = %s AND "
                "tenant_id = %s AND aggregate_id = %s AND parked_events = %s",
                (dead_letters.group, tenant_id, aggregate_id, parked_events))
            if cur.rowcount == 1:
                return Redrive(aggregate_id, applied, released=True)
        # More events were parked while we replayed: go again, from the top.


def _header(message: Any, name: str) -> str | None:
    for key, value in message.headers or ():
        if key == name:
            return value.decode()
    return None

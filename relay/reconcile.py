"""Re-publish from the events table every event the Kafka topics lack (e.g. a
broker that restarted empty): `ringiflow outbox reconcile`, and a relay itself
when it finds that the broker lost what it had acknowledged.

Per aggregate, everything from the first missing version on is queued again,
in version order, so the relay re-sends a complete ordered tail: duplicates are
possible, gaps and reordering are not. The re-queue holds the outbox against
appends (one short transaction per chunk of aggregates): an event committed
while it runs is either in the re-queued tail or queued after it, never lost
and never ahead of its predecessors (ADR 0003)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

import psycopg
from psycopg.types.json import Jsonb

from contract import (
    AggregateType,
    EventEnvelope,
    envelope_wire,
    events_topic_name,
    record_headers,
)
from infra.kafka import record_consumer, stop_consumer, topic_partitions_of
from relay.lanes import LANES

Progress = Callable[[str], None]

CHUNK = 500  # aggregates per re-queue transaction: appends wait for one chunk only
# As the outbox's lane column ("%%": the text goes into a query with parameters).
LANE_OF = f"get_byte(uuid_send(aggregate_id), 15) %% {LANES}"


@dataclass
class TopicReport:
    topic: str
    events: int = 0  # in the events table, inside the window
    in_kafka: int = 0
    missing: int = 0
    requeued: int = 0
    aggregates: set[tuple[UUID, UUID]] = field(default_factory=set)  # (tenant, id)

    def as_dict(self) -> dict[str, object]:
        return {"topic": self.topic, "events": self.events, "in_kafka": self.in_kafka,
                "missing": self.missing, "requeued": self.requeued,
                "aggregates": len(self.aggregates)}


async def event_ids_in_topic(bootstrap: str, topic: str) -> set[UUID]:
    """Every event id the topic holds now (read from the record headers)."""
    assigned = await topic_partitions_of(bootstrap, topic)
    consumer = record_consumer(bootstrap, group_id=None, fetch_max_bytes=50 * 1024 * 1024)
    await consumer.start()
    try:
        if not assigned:
            return set()
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        ends = await consumer.end_offsets(assigned)
        remaining = {tp for tp in assigned if ends[tp] > 0}
        seen: set[UUID] = set()
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000)
            for tp, messages in batch.items():
                for message in messages:
                    event_id = dict(message.headers).get("event_id")
                    if event_id:
                        seen.add(UUID(event_id.decode()))
                    if message.offset + 1 >= ends[tp]:
                        remaining.discard(tp)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        return seen
    finally:
        await stop_consumer(consumer)


async def reconcile(database_url: str, bootstrap: str, since: datetime | None, dry_run: bool,
                    progress: Progress = lambda _m: None) -> list[TopicReport]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        return await reconcile_on(conn, bootstrap, since, dry_run, progress)


async def reconcile_on(conn: psycopg.AsyncConnection, bootstrap: str, since: datetime | None,
                       dry_run: bool, progress: Progress = lambda _m: None,
                       lanes: Collection[int] | None = None) -> list[TopicReport]:
    """Compare, per topic, the events table (inside the window; of the given lanes
    only, for a relay) with the event ids the topic holds, and re-queue each
    aggregate's tail from its first missing version."""
    reports = []
    for aggregate_type in AggregateType:
        topic = events_topic_name(aggregate_type)
        report = TopicReport(topic)
        progress(f"reading {topic} from Kafka")
        present = await event_ids_in_topic(bootstrap, topic)
        progress(f"{topic}: {len(present)} events in Kafka; comparing with the events table")
        cur = await conn.execute(
            "SELECT event_id, tenant_id, aggregate_id, version FROM event_store.events "
            "WHERE aggregate_type = %(type)s "
            "AND (%(since)s::timestamptz IS NULL OR recorded_at >= %(since)s) "
            f"AND (%(lanes)s::int[] IS NULL OR {LANE_OF} = ANY(%(lanes)s)) "
            "ORDER BY tenant_id, aggregate_id, version",
            {"type": aggregate_type.value, "since": since,
             "lanes": sorted(lanes) if lanes is not None else None})
        first_missing: dict[tuple[UUID, UUID], int] = {}
        async for event_id, tenant_id, aggregate_id, version in cur:
            report.events += 1
            if event_id in present:
                report.in_kafka += 1
            else:
                report.missing += 1
                first_missing.setdefault((tenant_id, aggregate_id), version)
        report.aggregates = set(first_missing)
        if first_missing and not dry_run:
            items = list(first_missing.items())
            for start in range(0, len(items), CHUNK):
                report.requeued += await _requeue(conn, dict(items[start:start + CHUNK]), since)
            progress(f"{topic}: queued {report.requeued} events of "
                     f"{len(first_missing)} aggregates for the relay")
        reports.append(report)
    return reports


async def _requeue(conn: psycopg.AsyncConnection,
                   first_missing: dict[tuple[UUID, UUID], int],
                   since: datetime | None) -> int:
    """Replace the outbox rows of each aggregate's tail with fresh pending rows,
    inserted in version order (so their ids follow version order).

    The lock keeps appends out for this one transaction (they wait; reads and
    the relay's reads do not): the tail read after it holds every event
    committed before it, and any append after it gets a higher id."""
    tenants = [tenant for tenant, _id in first_missing]
    ids = [aggregate for _tenant, aggregate in first_missing]
    versions = list(first_missing.values())
    async with conn.transaction():
        await conn.execute("LOCK TABLE event_store.outbox IN SHARE ROW EXCLUSIVE MODE")
        cur = await conn.execute(
            "SELECT e.event_id, e.event_type, e.schema_version, e.aggregate_type, "
            "e.aggregate_id, e.version, e.occurred_at, e.payload, e.aggregate, e.metadata "
            "FROM event_store.events e "
            "JOIN unnest(%s::uuid[], %s::uuid[], %s::int[]) AS m(tenant, id, v) "
            "ON e.tenant_id = m.tenant AND e.aggregate_id = m.id AND e.version >= m.v "
            "AND (%s::timestamptz IS NULL OR e.recorded_at >= %s) "
            "ORDER BY e.tenant_id, e.aggregate_id, e.version",
            (tenants, ids, versions, since, since))
        columns = [c.name for c in cur.description or []]
        envelopes = [EventEnvelope.model_validate(dict(zip(columns, row, strict=True)))
                     for row in await cur.fetchall()]
        await conn.execute(
            "DELETE FROM event_store.outbox o "
            "USING unnest(%s::uuid[], %s::uuid[], %s::int[]) AS m(tenant, id, v) "
            "WHERE o.tenant_id = m.tenant AND o.aggregate_id = m.id AND o.version >= m.v",
            (tenants, ids, versions))
        rows = [
            (e.event_id, e.tenant_id, e.aggregate_type.value, e.aggregate_id, e.version,
             e.event_type, events_topic_name(e.aggregate_type),
             envelope_wire(e), Jsonb({k: v.decode() for k, v in record_headers(e)}))
            for e in envelopes
        ]
        async with conn.cursor() as cursor:
            await cursor.executemany(
                "INSERT INTO event_store.outbox (event_id, tenant_id, aggregate_type, "
                "aggregate_id, version, event_type, topic, payload, metadata) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)", rows)
    return len(rows)

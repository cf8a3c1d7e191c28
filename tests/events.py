"""Appending synthetic events straight into the event store, and reading topics
back: for tests of the relay and the stream processors."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import psycopg

import contract
from commands.store import outbox_items
from infra.kafka import record_consumer, stop_consumer, topic_partitions_of
from infra.settings import libpq_url


def comment_envelope(tenant: UUID, aggregate_id: UUID, version: int,
                     filler: int = 0) -> contract.EventEnvelope:
    return contract.EventEnvelope(
        event_type="CommentAdded", aggregate_type="workflow", aggregate_id=aggregate_id,
        version=version, occurred_at=contract.utcnow(),
        payload={"body": f"v{version}", "filler": "x" * filler},
        aggregate={"version": version},
        metadata=contract.EventMetadata(tenant_id=tenant, correlation_id=uuid4(),
                                        trace_id=contract.new_trace_id()),
    )


def append_on(conn: psycopg.Connection, envelopes: list[contract.EventEnvelope]) -> None:
    """One appending statement on `conn`, through the server-side function the command
    API uses (in `conn`'s transaction, if one is open)."""
    conn.execute("SELECT event_store.append_events(%s, %s, %b)",
                 (envelopes[0].tenant_id, *outbox_items(envelopes)))


def append(database_url: str, envelopes: list[contract.EventEnvelope]) -> None:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        append_on(conn, envelopes)


def append_streams(database_url: str, aggregates: int, versions: int, tenant: UUID | None = None,
                   start: int = 1, ids: list[UUID] | None = None) -> list[UUID]:
    """`aggregates` streams of `versions` events each, interleaved across
    statements the way concurrent commands would commit them."""
    tenant = tenant or uuid4()
    ids = ids or [uuid4() for _ in range(aggregates)]
    for version in range(start, start + versions):
        append(database_url, [comment_envelope(tenant, a, version) for a in ids])
    return ids


@dataclass(frozen=True)
class Consumed:
    partition: int
    offset: int
    key: bytes
    headers: dict[str, bytes]
    envelope: contract.EventEnvelope
    value: bytes  # as the broker holds it


async def read_topic(bootstrap: str, topic: str, expect: set[UUID],
                     timeout_s: float = 60) -> list[Consumed]:
    """Everything on the topic, from the beginning, once every expected event id
    has arrived (and the topic's current end has been reached)."""
    partitions = await topic_partitions_of(bootstrap, topic)
    consumer = record_consumer(bootstrap)
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        out: list[Consumed] = []
        seen: set[UUID] = set()
        async with asyncio.timeout(timeout_s):
            while True:
                batch = await consumer.getmany(timeout_ms=300)
                for messages in batch.values():
                    for m in messages:
                        envelope = contract.decode_envelope(m.value)
                        seen.add(envelope.event_id)
                        out.append(Consumed(m.partition, m.offset, m.key, dict(m.headers),
                                            envelope, m.value))
                if expect <= seen and not batch:
                    return out
    finally:
        await stop_consumer(consumer)


def per_aggregate(consumed: list[Consumed]) -> dict[UUID, list[int]]:
    """Versions of each aggregate in the order a consumer of its partition sees them."""
    ordered = sorted(consumed, key=lambda c: (c.partition, c.offset))
    versions: dict[UUID, list[int]] = defaultdict(list)
    for c in ordered:
        versions[c.envelope.aggregate_id].append(c.envelope.version)
    return versions


def never_ahead(versions: list[int]) -> bool:
    """True when no version appears before every lower version has appeared:
    re-deliveries of old versions are allowed, skipping ahead is not."""
    highest = 0
    for version in versions:
        if version > highest + 1:
            return False
        highest = max(highest, version)
    return True


def wait_all_published(database_url: str, timeout_s: float = 60) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + timeout_s
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'pending'), "
                "count(*) FILTER (WHERE status = 'published'), "
                "count(*) FILTER (WHERE status = 'failed') FROM event_store.outbox_state"
            ).fetchone()
            assert row is not None
            counts = {"pending": row[0], "published": row[1], "failed": row[2]}
            if row[0] == 0 or time.monotonic() > deadline:
                return counts
            time.sleep(0.1)

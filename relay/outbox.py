"""The outbox table as the relay and operators see it (relay role, all tenants)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import orjson
from psycopg import AsyncConnection

from relay.publisher import Outcome, Row

MIN_PER_LANE = 200  # keeps batches large when the backlog sits in a few lanes

# One ordered index walk per lane (on (lane, id) of pending rows), each stopping
# at its limit: the cost follows the batch, not the backlog, whatever the
# planner's statistics say after a long broker outage. Read in binary: the payload
# arrives as the bytes to send (ADR 0015); ids as text, compared and sent as keys only.
FETCH = """
SELECT o.id, o.tenant_id::text, o.aggregate_id::text, o.lane, o.version, o.topic, o.payload,
       o.metadata::text, extract(epoch FROM o.created_at)::float8, o.next_attempt_at
FROM unnest(%(lanes)s::smallint[], %(after)s::bigint[]) AS l(lane, after_id)
CROSS JOIN LATERAL (
    SELECT * FROM event_store.outbox p
    WHERE p.status = 'pending' AND p.lane = l.lane AND p.id > l.after_id
      AND NOT EXISTS (SELECT 1 FROM event_store.outbox f
                      WHERE f.tenant_id = p.tenant_id AND f.aggregate_id = p.aggregate_id
                        AND f.status = 'failed')
    ORDER BY p.id
    LIMIT %(per_lane)s
) AS o
"""


@dataclass(frozen=True)
class Batch:
    rows: list[Row]
    # The last id read per lane, when the next batch may continue after it: only
    # if nothing was held back (a held row's successors must not be read past it).
    cursor: dict[int, int] | None


async def fetch_batch(conn: AsyncConnection, lanes: set[int], limit: int,
                      after: dict[int, int] | None = None) -> Batch:
    """Pending rows of the given lanes, each lane in id order, which per aggregate
    is version order (an aggregate lives in one lane). A row waiting out its
    backoff holds back the rest of its aggregate. `after` continues behind a
    batch still in flight.

    Per-row status (not a high-water mark) means a row committed after a higher
    id was read is simply picked up by a later full read: nothing is skipped."""
    if not lanes:
        return Batch([], None)
    ordered = sorted(lanes)
    per_lane = max(math.ceil(limit / len(lanes)), MIN_PER_LANE)
    cur = await conn.execute(FETCH, {"lanes": ordered, "per_lane": per_lane,
                                     "after": [(after or {}).get(lane, 0) for lane in ordered]},
                             binary=True)
    now = datetime.now(UTC)
    rows: list[Row] = []
    waiting: set[tuple[str, str]] = set()
    cursor: dict[int, int] = dict(after or {})
    for row_id, tenant_id, aggregate_id, lane, version, topic, payload, headers, created, \
            next_at in await cur.fetchall():
        cursor[lane] = row_id
        if (tenant_id, aggregate_id) in waiting:
            continue
        if next_at is not None and next_at > now:
            waiting.add((tenant_id, aggregate_id))
            continue
        rows.append(Row(row_id, tenant_id, aggregate_id, lane, version, topic, payload,
                        orjson.loads(headers), created))
    return Batch(rows, None if waiting else cursor)


# The ids and ack times go as array literals in text: psycopg's list dumper walks
# every element in Python, which cost the relay more than the statement itself.
MARK_PUBLISHED = """
WITH moved AS (
    DELETE FROM event_store.outbox o
    USING unnest(%s::text::bigint[], %s::text::float8[]) AS a(id, at)
    WHERE o.id = a.id
    RETURNING o.id, o.event_id, o.tenant_id, o.aggregate_type, o.aggregate_id, o.version,
              o.event_type, o.topic, o.retry_count, o.created_at, to_timestamp(a.at)
)
INSERT INTO event_store.outbox_published SELECT * FROM moved
"""


def array_literal(values: list[int] | list[float]) -> str:
    return "{" + ",".join(map(repr, values)) + "}"


@dataclass(frozen=True)
class Recorded:
    published: int
    retried: int
    failed: int
    latencies_s: list[float]
    broken: set[tuple[str, str]]  # streams whose tail stays pending behind an unacknowledged row


async def record(conn: AsyncConnection, rows: list[Row], outcome: Outcome, max_attempts: int,
                 backoff_s: float, max_backoff_s: float) -> Recorded:
    """Mark, per aggregate, the acknowledged prefix published. The first row that
    was not acknowledged gets an attempt recorded (failed after max_attempts
    permanent errors); rows after it stay pending and go out again after it."""
    published_ids: list[int] = []
    acked_at: list[float] = []  # epoch seconds
    latencies: list[float] = []
    broken: set[tuple[str, str]] = set()
    attempts: list[tuple[int, str, bool]] = []
    for row in rows:
        if row.stream in broken:
            continue
        if row.id in outcome.acked_at:
            published_ids.append(row.id)
            acked = outcome.acked_at[row.id]
            acked_at.append(acked)
            latencies.append(max(0.0, acked - row.created_at))
            continue
        broken.add(row.stream)
        why, permanent = outcome.errors.get(row.id, ("not acknowledged", False))
        attempts.append((row.id, why, permanent))
    if published_ids:
        await conn.execute(MARK_PUBLISHED, (array_literal(published_ids),
                                            array_literal(acked_at)))
    failed = 0
    for row_id, why, permanent in attempts:
        cur = await conn.execute(
            "UPDATE event_store.outbox SET retry_count = retry_count + 1, last_error = %(why)s, "
            "next_attempt_at = clock_timestamp() + least(%(max)s, %(base)s * "
            "  power(2, least(retry_count, 16))) * interval '1 second', "
            "status = CASE WHEN %(permanent)s AND retry_count + 1 >= %(attempts)s "
            "  THEN 'failed' ELSE status END "
            "WHERE id = %(id)s RETURNING status",
            {"why": why[:2000], "max": max_backoff_s, "base": backoff_s, "permanent": permanent,
             "attempts": max_attempts, "id": row_id})
        status = await cur.fetchone()
        failed += bool(status and status[0] == "failed")
    return Recorded(len(published_ids), len(attempts) - failed, failed, latencies, broken)


@dataclass(frozen=True)
class Status:
    pending: int
    published: int
    failed: int
    oldest_pending_age_s: float | None
    blocked_aggregates: int
    failed_rows: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__


async def status(conn: AsyncConnection, failed_limit: int = 50,
                 count_published: bool = True) -> Status:
    cur = await conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'pending'), "
        "count(*) FILTER (WHERE status = 'failed'), "
        "extract(epoch FROM clock_timestamp() - min(created_at) FILTER (WHERE status = 'pending')),"
        "count(DISTINCT aggregate_id) FILTER (WHERE status = 'failed') "
        "FROM event_store.outbox")
    pending, failed, age, blocked = await cur.fetchone()  # type: ignore[misc]
    published = -1
    if count_published:
        cur = await conn.execute("SELECT count(*) FROM event_store.outbox_published")
        published = (await cur.fetchone() or (0,))[0]
    cur = await conn.execute(
        "SELECT id, event_id, aggregate_type, aggregate_id, version, event_type, retry_count, "
        "last_error, created_at FROM event_store.outbox WHERE status = 'failed' "
        "ORDER BY id LIMIT %s", (failed_limit,))
    columns = [c.name for c in cur.description or []]
    rows = [dict(zip(columns, r, strict=True)) for r in await cur.fetchall()]
    return Status(pending, published, failed, float(age) if age is not None else None, blocked,
                  orjson.loads(orjson.dumps(rows, default=str)))


async def cleanup(conn: AsyncConnection, retention: timedelta, batch_size: int = 1000) -> int:
    """Delete published rows older than the retention, in small batches so no
    long lock or transaction holds up appends."""
    deleted = 0
    while True:
        cur = await conn.execute(
            "DELETE FROM event_store.outbox_published WHERE id IN (SELECT id FROM "
            "event_store.outbox_published WHERE published_at < clock_timestamp() - %s "
            "ORDER BY published_at LIMIT %s)", (retention, batch_size))
        deleted += cur.rowcount
        if cur.rowcount < batch_size:
            return deleted


async def retry_failed(conn: AsyncConnection, aggregate_id: UUID | None = None) -> int:
    """Give failed rows (of one aggregate, or all) a new start."""
    cur = await conn.execute(
        "UPDATE event_store.outbox SET status = 'pending', retry_count = 0, "
        "next_attempt_at = NULL WHERE status = 'failed' "
        "AND (%(aggregate)s::uuid IS NULL OR aggregate_id = %(aggregate)s)",
        {"aggregate": aggregate_id})
    return cur.rowcount

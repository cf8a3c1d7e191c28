"""The event store on PostgreSQL: load an aggregate, append its new events
together with their outbox rows and the idempotency record, in one
transaction on the least-privilege command role."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import orjson
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb, set_json_dumps, set_json_loads

from commands.domain import AggregateState, DomainEvent, fold, initial_state
from contract import EventEnvelope, record_headers, to_record

set_json_dumps(orjson.dumps)
set_json_loads(orjson.loads)

LOAD_EVENTS = """
SELECT event_type, payload FROM event_store.events
WHERE aggregate_id = %s AND aggregate_type = %s ORDER BY version
"""

LATEST_SNAPSHOT = """
SELECT aggregate FROM event_store.events
WHERE aggregate_id = %s AND aggregate_type = %s ORDER BY version DESC LIMIT 1
"""

EVENT_COLUMNS = ("event_id", "tenant_id", "aggregate_type", "aggregate_id", "version",
                 "event_type", "schema_version", "occurred_at", "payload", "aggregate", "metadata")
OUTBOX_COLUMNS = ("event_id", "tenant_id", "aggregate_type", "aggregate_id", "version",
                  "event_type", "topic", "payload", "metadata")


class VersionConflict(Exception):
    """Another command appended to the aggregate first."""


async def set_tenant(conn: AsyncConnection, tenant_id: UUID) -> None:
    await conn.execute("SELECT set_config('ringiflow.tenant_id', %s, true)", (str(tenant_id),))


async def load(conn: AsyncConnection, aggregate_type: str, aggregate_id: UUID) -> AggregateState:
    """The aggregate folded from its full stream; version 0 when it does not exist
    (or belongs to another tenant: row-level security hides it)."""
    cur = await conn.execute(LOAD_EVENTS, (aggregate_id, aggregate_type))
    events = [DomainEvent(event_type, payload) for event_type, payload in await cur.fetchall()]
    return fold(initial_state(aggregate_type, aggregate_id), events)


async def latest_snapshot(
    conn: AsyncConnection, aggregate_type: str, aggregate_id: UUID
) -> dict[str, Any] | None:
    """Another aggregate's current state, read from its newest event (read-only use)."""
    cur = await conn.execute(LATEST_SNAPSHOT, (aggregate_id, aggregate_type))
    row = await cur.fetchone()
    return row[0] if row else None


def _values_sql(columns: tuple[str, ...], rows: int) -> str:
    one = "(" + ", ".join(["%s"] * len(columns)) + ")"
    return ", ".join([one] * rows)


async def append(conn: AsyncConnection, envelopes: list[EventEnvelope]) -> int:
    """Insert events and their outbox rows in one statement; return the last
    event's global position. A duplicate (aggregate_id, version) means a
    concurrent writer won: VersionConflict."""
    from psycopg.errors import UniqueViolation

    event_params: list[Any] = []
    outbox_params: list[Any] = []
    for envelope in envelopes:
        data = envelope.model_dump(mode="json")
        common = (envelope.event_id, envelope.tenant_id, envelope.aggregate_type.value,
                  envelope.aggregate_id, envelope.version, envelope.event_type)
        event_params += [*common, envelope.schema_version, envelope.occurred_at,
                         Jsonb(data["payload"]), Jsonb(data["aggregate"]),
                         Jsonb(data["metadata"])]
        headers = {k: v.decode() for k, v in record_headers(envelope)}
        outbox_params += [*common, to_record(envelope).topic, Jsonb(data), Jsonb(headers)]
    query = (
        f"WITH appended AS (INSERT INTO event_store.events ({', '.join(EVENT_COLUMNS)}) "
        f"VALUES {_values_sql(EVENT_COLUMNS, len(envelopes))} RETURNING position), "
        f"queued AS (INSERT INTO event_store.outbox ({', '.join(OUTBOX_COLUMNS)}) "
        f"VALUES {_values_sql(OUTBOX_COLUMNS, len(envelopes))}) "
        "SELECT max(position) FROM appended"
    )
    try:
        cur = await conn.execute(query, [*event_params, *outbox_params])
    except UniqueViolation as exc:
        if "aggregate_version" in str(exc.diag.constraint_name):
            raise VersionConflict from exc
        raise
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def current_version(conn: AsyncConnection, aggregate_id: UUID) -> int:
    cur = await conn.execute(
        "SELECT coalesce(max(version), 0) FROM event_store.events WHERE aggregate_id = %s",
        (aggregate_id,),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


# --- idempotency ------------------------------------------------------------------


@dataclass(frozen=True)
class StoredResponse:
    request_hash: str
    status_code: int
    body: dict[str, Any]


async def claim_idempotency_key(
    conn: AsyncConnection, tenant_id: UUID, key: str, request_hash: str
) -> StoredResponse | None:
    """Claim the key for this transaction, or return the response stored under it.

    The placeholder row makes a concurrent retry with the same key wait for
    this transaction instead of executing the command a second time.
    """
    cur = await conn.execute(
        "INSERT INTO event_store.idempotency_keys (tenant_id, idempotency_key, request_hash, "
        "status_code, response) VALUES (%s, %s, %s, 0, '{}') ON CONFLICT DO NOTHING",
        (tenant_id, key, request_hash),
    )
    if cur.rowcount == 1:
        return None
    cur = await conn.execute(
        "SELECT request_hash, status_code, response FROM event_store.idempotency_keys "
        "WHERE tenant_id = %s AND idempotency_key = %s", (tenant_id, key),
    )
    row = await cur.fetchone()
    assert row is not None, "idempotency row vanished"
    return StoredResponse(row[0], row[1], row[2])


async def record_response(conn: AsyncConnection, tenant_id: UUID, key: str, status_code: int,
                          body: dict[str, Any]) -> None:
    await conn.execute(
        "UPDATE event_store.idempotency_keys SET status_code = %s, response = %s "
        "WHERE tenant_id = %s AND idempotency_key = %s",
        (status_code, Jsonb(body), tenant_id, key),
    )

"""The event store on PostgreSQL, seen from the command side.

Each call is one statement on an autocommit connection of the least-privilege
command role: a server-side function sets the tenant for row-level security
and does its work in that statement's own transaction. A command costs one
round trip (the append) when the process still holds its aggregate (ADR 0013) and
what it reads of other aggregates (ADR 0016), one more for each it must read;
optimistic concurrency rests on the unique (tenant_id, aggregate_id, version) and
on the append checking the versions read, so no read need share its transaction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from uuid import UUID

import orjson
from psycopg import AsyncConnection, DatabaseError, errors
from psycopg.errors import UniqueViolation
from psycopg.types.json import Jsonb, set_json_dumps, set_json_loads

from commands.domain import AggregateState, DomainEvent, fold, initial_state
from contract import EventEnvelope, envelope_wire, events_topic_name, record_headers
from infra import tracing

set_json_dumps(orjson.dumps)
set_json_loads(orjson.loads)


class VersionConflict(Exception):
    """Another command appended to the aggregate first."""


class IdempotencyKeyTaken(Exception):
    """A concurrent request with the same Idempotency-Key committed first."""


# Raised by `event_store.append_at` (migration 0013) when an aggregate the command
# read is no longer at the version it was read at; nothing is written.
READS_MOVED = "RF001"


class ReadsMoved(Exception):
    """An aggregate the command read from moved on before the append (ADR 0016)."""


class Snapshot(NamedTuple):
    """Another aggregate's state as of its newest event, and that event's version."""

    version: int
    state: dict[str, Any]


@dataclass(frozen=True)
class StoredResponse:
    request_hash: str
    status_code: int
    body: dict[str, Any]


async def load(conn: AsyncConnection, tenant_id: UUID, aggregate_type: str,
               aggregate_id: UUID) -> AggregateState:
    """The aggregate folded from its full stream; version 0 when it does not exist
    (or belongs to another tenant: row-level security hides it)."""
    cur = await conn.execute("SELECT * FROM event_store.load_stream(%s, %s, %s)",
                             (tenant_id, aggregate_type, aggregate_id))
    events = [DomainEvent(event_type, payload) for event_type, payload in await cur.fetchall()]
    return fold(initial_state(aggregate_type, aggregate_id), events)


async def latest_snapshots(conn: AsyncConnection, tenant_id: UUID, aggregate_type: str,
                           aggregate_ids: set[UUID]) -> dict[UUID, Snapshot]:
    """Other aggregates' current state, read from their newest events; those not
    found (or of another tenant) are absent."""
    cur = await conn.execute("SELECT * FROM event_store.latest_snapshots(%s, %s, %s)",
                             (tenant_id, aggregate_type, list(aggregate_ids)))
    return {aggregate_id: Snapshot(version, aggregate)
            for aggregate_id, version, aggregate in await cur.fetchall()}


async def stored_response(conn: AsyncConnection, tenant_id: UUID,
                          key: str) -> StoredResponse | None:
    cur = await conn.execute("SELECT * FROM event_store.idempotent_response(%s, %s)",
                             (tenant_id, key))
    row = await cur.fetchone()
    return StoredResponse(*row) if row else None


async def definition_with_assignees(
        conn: AsyncConnection, tenant_id: UUID, definition_id: UUID,
) -> tuple[Snapshot | None, dict[UUID, Snapshot]]:
    """A definition's current snapshot and its registered assignees' (by id), in one
    round trip."""
    cur = await conn.execute("SELECT * FROM event_store.definition_with_assignees(%s, %s)",
                             (tenant_id, definition_id))
    definition, users = None, {}
    for aggregate_type, aggregate_id, version, aggregate in await cur.fetchall():
        if aggregate_type == "definition":
            definition = Snapshot(version, aggregate)
        else:
            users[aggregate_id] = Snapshot(version, aggregate)
    return definition, users


class OutboxItems(NamedTuple):
    """The append functions' `p_events` (each event's topic and record headers) and
    `p_wire` (each envelope's JSON: the record value, byte for byte; ADR 0015). Pass
    `wire` as a binary parameter (`%b`): as text, psycopg escapes every byte."""

    targets: Jsonb
    wire: list[bytes]


def outbox_items(envelopes: list[EventEnvelope]) -> OutboxItems:
    # The append span's context goes with each outbox row: the relay continues it.
    span = tracing.current_span_context()
    span_id = f"{span.span_id:016x}" if span is not None else None
    return OutboxItems(
        Jsonb([{"topic": events_topic_name(envelope.aggregate_type),
                "headers": {k: v.decode() for k, v in record_headers(envelope, span_id)}}
               for envelope in envelopes]),
        [envelope_wire(envelope) for envelope in envelopes])


def _refusal(constraint: str | None) -> Exception | None:
    """The refusal a unique violation of the append means, if it is one of ours."""
    if constraint == "events_aggregate_version":
        return VersionConflict()
    if constraint == "idempotency_keys_pkey":
        return IdempotencyKeyTaken()
    return None


class Append(NamedTuple):
    """One command's append: its stream, the version it was decided at (`head`), its
    outbox items, its idempotency record, and each aggregate it read at the version
    read."""

    tenant_id: UUID
    aggregate_type: str
    aggregate_id: UUID
    head: int
    items: OutboxItems
    idempotency: dict[str, Any] | None = None
    reads: Mapping[UUID, int] | None = None


# The stream's last global position once appended, or the events after `head` when
# the stream had moved on (nothing written).
Appended = int | list[DomainEvent]


def append_of(tenant_id: UUID, aggregate_type: str, aggregate_id: UUID, head: int,
              envelopes: list[EventEnvelope], idempotency: dict[str, Any] | None = None,
              reads: Mapping[UUID, int] | None = None) -> Append:
    """Built in the command's own span: its outbox rows carry that span's context."""
    return Append(tenant_id, aggregate_type, aggregate_id, head, outbox_items(envelopes),
                  idempotency, reads)


async def append(conn: AsyncConnection, a: Append) -> Appended:
    """Append events with their outbox rows (and the idempotency record) atomically,
    if the stream is still at version `head`: the last event's global position. If
    it moved on, nothing is written and the events after `head` are returned
    instead (ADR 0013). If an aggregate the command read moved on, nothing is
    written and `ReadsMoved` is raised (ADR 0016)."""
    reads = a.reads
    try:
        cur = await conn.execute(
            "SELECT * FROM event_store.append_at(%s, %s, %s, %s, %s, %b, %s, "
            "%s::uuid[], %s::integer[])",
            (a.tenant_id, a.aggregate_type, a.aggregate_id, a.head, *a.items,
             Jsonb(a.idempotency) if a.idempotency else None,
             list(reads) if reads else None, list(reads.values()) if reads else None))
    except UniqueViolation as exc:
        refusal = _refusal(exc.diag.constraint_name)
        if refusal is None:
            raise
        raise refusal from exc
    except DatabaseError as exc:
        if exc.sqlstate == READS_MOVED:
            raise ReadsMoved(exc.diag.message_primary) from exc
        raise
    return _appended(await cur.fetchall())


def _appended(rows: list[tuple[Any, Any, Any]]) -> Appended:
    if len(rows) == 1 and rows[0][0] is not None:
        return int(rows[0][0])
    return [DomainEvent(event_type, payload) for _p, event_type, payload in rows]


async def append_batch(conn: AsyncConnection,
                       appends: Sequence[Append]) -> list[Appended | Exception]:
    """Each append as `append` would do it, all in one transaction (ADR 0018): its
    outcome, or the refusal or error `append` would raise for it, which undid that
    append only. An error of the transaction itself is raised."""
    reads = [a.reads or {} for a in appends]
    cur = await conn.execute(
        "SELECT * FROM event_store.append_batch(%s::uuid[], %s::text[], %s::uuid[], "
        "%s::integer[], %s::integer[], %s, %b, %s, %s::integer[], %s::uuid[], %s::integer[])",
        ([a.tenant_id for a in appends], [a.aggregate_type for a in appends],
         [a.aggregate_id for a in appends], [a.head for a in appends],
         [len(a.items.wire) for a in appends], Jsonb([a.items.targets.obj for a in appends]),
         [wire for a in appends for wire in a.items.wire],
         Jsonb([a.idempotency for a in appends]), [len(r) for r in reads],
         [i for r in reads for i in r], [v for r in reads for v in r.values()]))
    rows: list[list[tuple[Any, Any, Any]]] = [[] for _ in appends]
    refused: dict[int, Exception] = {}
    for item, position, event_type, payload, sqlstate, constraint, message in (
            await cur.fetchall()):
        if sqlstate is None:
            rows[item - 1].append((position, event_type, payload))
        else:
            refused[item - 1] = _batch_refusal(sqlstate, constraint, message)
    return [refused.get(i) or _appended(r) for i, r in enumerate(rows)]


def _batch_refusal(sqlstate: str, constraint: str | None, message: str) -> Exception:
    """What `append` raises for this error, which the batch returned instead."""
    if sqlstate == READS_MOVED:
        return ReadsMoved(message)
    try:
        error = errors.lookup(sqlstate)(message)
    except KeyError:  # a SQLSTATE psycopg has no class for
        error = DatabaseError(f"{message} (SQLSTATE {sqlstate})")
    if isinstance(error, UniqueViolation):
        return _refusal(constraint) or error
    return error


async def current_version(conn: AsyncConnection, tenant_id: UUID, aggregate_id: UUID) -> int:
    cur = await conn.execute("SELECT event_store.stream_version(%s, %s)",
                             (tenant_id, aggregate_id))
    row = await cur.fetchone()
    return int(row[0]) if row else 0

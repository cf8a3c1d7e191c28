"""Projections declared as data: which events, which store. A store applies a
batch idempotently and order-safely, so at-least-once delivery, replays and
re-drives of older events never change the final state.

Every event carries the aggregate's state after it (`aggregate`), so each read
model is a function of the newest snapshot it has seen, guarded by version:
an older or repeated event is recognised and skipped, never re-applied."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

import psycopg

from contract import APPLIED_NOTIFY_CHANNEL, Applied, EventEnvelope, applied_payloads

log = logging.getLogger("ringiflow.projectors")


async def notify_applied(conn: Any, read_model: str, applied: Iterable[Applied]) -> None:
    """NOTIFY what a batch made visible in `read_model`, so consistency waits wake."""
    payloads = applied_payloads(read_model, applied)
    if payloads:  # one round trip, however many chunks
        await conn.execute("SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p",
                           (APPLIED_NOTIFY_CHANNEL, payloads))


class Announcer:
    """NOTIFYs what a store made visible in `read_model`, on a connection of its own,
    so the query API's consistency waits wake at once (ADR 0008). A lost wake-up only
    costs a waiter its fallback poll, so a failure is logged, never retried."""

    def __init__(self, database_url: str, read_model: str) -> None:
        self.database_url, self.read_model = database_url, read_model
        self.conn: psycopg.AsyncConnection | None = None

    async def __call__(self, applied: Sequence[Applied]) -> None:
        if not applied:
            return
        try:
            if self.conn is None or self.conn.closed:
                self.conn = await psycopg.AsyncConnection.connect(
                    self.database_url, autocommit=True, connect_timeout=2)
            await notify_applied(self.conn, self.read_model, applied)
        except psycopg.Error as exc:
            log.warning("could not announce what %s made visible (%s); waiters fall back "
                        "to polling", self.read_model, exc)
            await self.close()

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None


class Retryable(Exception):
    """Worth trying again: connection lost, timeout, 429/5xx, deadlock."""


class Unavailable(Retryable):
    """The store cannot be reached at all: retried without limit (nothing else can
    be applied either); lag and event age tell the operator."""


class NonRetryable(Exception):
    """Will fail the same way every time: dead-letter the event at once."""


@dataclass(frozen=True)
class Delivery:
    """One event as a projector receives it."""

    envelope: EventEnvelope
    replay: bool = False  # re-projected: side effects (notifications) stay quiet


class Store(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def apply(self, batch: Sequence[Delivery]) -> None:
        """Apply every event of the batch, idempotently; raise Retryable or
        NonRetryable (the runtime then isolates the event that caused it)."""
        ...


@dataclass(frozen=True)
class Projection:
    group: str  # the consumer group: offsets, lag, retry policy and DLQ of its own
    topics: tuple[str, ...]
    event_types: frozenset[str] | None  # None: every event on the topics
    store: Store = field(compare=False)

    def handles(self, event_type: str) -> bool:
        return self.event_types is None or event_type in self.event_types


def newest_by_aggregate(batch: Sequence[Delivery]) -> list[Delivery]:
    """Only the newest event of each (tenant's) aggregate can change a
    snapshot-based row."""
    newest: dict[tuple[UUID, UUID], Delivery] = {}
    for delivery in batch:
        stream = (delivery.envelope.tenant_id, delivery.envelope.aggregate_id)
        current = newest.get(stream)
        if current is None or delivery.envelope.version > current.envelope.version:
            newest[stream] = delivery
    return list(newest.values())

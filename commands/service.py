"""Executing one command: load, decide, append, all in one transaction. No HTTP: a
refusal is a domain error or one of the application errors below, which the edge maps
to problem+json (`commands.app`)."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from commands import domain, store
from contract import (
    AggregateType,
    ConsistencyToken,
    EventEnvelope,
    EventMetadata,
    utcnow,
)
from infra import tracing
from infra.auth import Principal
from infra.problems import AppError

BuildCommand = Callable[[AsyncConnection], Awaitable[domain.Command]]


class VersionConflict(AppError):
    """The aggregate is not at the version the caller expected (or another command
    changed it first); `current_version` says where it is."""

    code = "version_conflict"


class IdempotencyKeyReused(AppError):
    code = "idempotency_key_reused"


class NotAllowed(AppError):
    """The caller's roles do not allow this command."""

    code = "forbidden"


@dataclass(frozen=True)
class CommandContext:
    principal: Principal
    command_id: UUID
    correlation_id: UUID
    trace_id: str
    idempotency_key: str | None
    expected_version: int | None
    request_fingerprint: str  # method, path and canonical body

    @property
    def request_hash(self) -> str:
        return hashlib.sha256(self.request_fingerprint.encode()).hexdigest()


@dataclass(frozen=True)
class Outcome:
    status_code: int
    body: dict[str, Any]
    replayed: bool = False


def envelopes_for(
    state: domain.AggregateState, events: list[domain.DomainEvent], ctx: CommandContext,
) -> list[EventEnvelope]:
    """Number the events after the current version and attach the state after each."""
    now = utcnow()
    out: list[EventEnvelope] = []
    aggregate_type = type(state).__name__.removesuffix("State").lower()
    for event in events:
        state = domain.evolve(state, event)
        out.append(EventEnvelope(
            event_type=event.event_type, aggregate_type=AggregateType(aggregate_type),
            aggregate_id=state.id, version=state.version, occurred_at=now,
            payload=event.payload, aggregate=state.snapshot(),
            metadata=EventMetadata(
                tenant_id=ctx.principal.tenant_id, user_id=ctx.principal.user_id,
                correlation_id=ctx.correlation_id, causation_id=ctx.command_id,
                trace_id=ctx.trace_id,
            ),
        ))
    return out


async def execute(
    pool: AsyncConnectionPool, ctx: CommandContext, aggregate_type: str, aggregate_id: UUID,
    build: BuildCommand, created_status: int = 200,
) -> Outcome:
    """Load, decide, append: two round trips on an autocommit connection."""
    principal, tenant = ctx.principal, ctx.principal.tenant_id
    actor = domain.Actor(principal.user_id, principal.name, principal.roles)
    async with pool.connection() as conn:
        if ctx.idempotency_key:
            stored = await store.stored_response(conn, tenant, ctx.idempotency_key)
            if stored is not None:
                return _replay(stored, ctx)
        state = await store.load(conn, tenant, aggregate_type, aggregate_id)
        if ctx.expected_version is not None and state.version != ctx.expected_version:
            raise _conflict(aggregate_type, aggregate_id, state.version,
                            f"expected version {ctx.expected_version}")
        events = domain.decide(await build(conn), state, actor, utcnow())
        envelopes = envelopes_for(state, events, ctx)
        result = {
            "aggregate_type": aggregate_type, "aggregate_id": str(aggregate_id),
            "version": envelopes[-1].version, "event_ids": [str(e.event_id) for e in envelopes],
            "correlation_id": str(ctx.correlation_id), "command_id": str(ctx.command_id),
        }
        idempotency = None
        if ctx.idempotency_key:
            idempotency = {"key": ctx.idempotency_key, "request_hash": ctx.request_hash,
                           "status_code": created_status, "response": result}
        try:
            with tracing.tracer.start_as_current_span(
                    f"append {aggregate_type}", attributes={
                        "ringiflow.aggregate_id": str(aggregate_id),
                        "ringiflow.version": envelopes[-1].version,
                        "ringiflow.event_types": [e.event_type for e in envelopes]}):
                await store.append(conn, tenant, envelopes, idempotency)
        except store.VersionConflict:
            current = await store.current_version(conn, tenant, aggregate_id)
            raise _conflict(aggregate_type, aggregate_id, current,
                            "another command changed it first") from None
        except store.IdempotencyKeyTaken:
            stored = await store.stored_response(conn, tenant, ctx.idempotency_key or "")
            assert stored is not None
            return _replay(stored, ctx)
        return Outcome(created_status, response_body(result))


def response_body(result: dict[str, Any]) -> dict[str, Any]:
    token = ConsistencyToken(AggregateType(result["aggregate_type"]),
                             UUID(result["aggregate_id"]), result["version"])
    return {**{k: v for k, v in result.items() if k != "position"},
            "consistency_token": token.encode()}


def _replay(stored: store.StoredResponse, ctx: CommandContext) -> Outcome:
    if stored.request_hash != ctx.request_hash:
        raise IdempotencyKeyReused(
            f"Idempotency-Key {ctx.idempotency_key!r} was first used for a different request; "
            "use a new key for a new request")
    return Outcome(stored.status_code, response_body(stored.body),
                   replayed=True)


def _conflict(aggregate_type: str, aggregate_id: UUID, current: int,
              why: str) -> VersionConflict:
    return VersionConflict(
        f"{aggregate_type} {aggregate_id} is at version {current} ({why}); reload it and "
        "retry with expected_version set to the current version", current_version=current)

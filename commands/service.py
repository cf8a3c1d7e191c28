"""Executing one command: state, reads, decide, append (ADR 0002, 0013, 0016). No HTTP: a
refusal is a domain error or one of the application errors below, which the edge maps
to problem+json (`commands.app`)."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

from prometheus_client import Counter
from psycopg_pool import AsyncConnectionPool

from commands import domain, store
from commands.bell import OutboxBell
from commands.cache import StateCache
from commands.group_commit import GroupCommit
from commands.reads import Reads
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

# Builds the command, reading what it needs of other aggregates through `Reads`.
BuildCommand = Callable[[Reads], Awaitable[domain.Command]]
FRESH_READ_ATTEMPTS = 5  # a command whose reads keep moving under it is refused after this

# How each command found its aggregate's state (ADR 0013): `cached` (the process's
# copy was current: one round trip), `stale` (the append brought it up to date),
# `loaded`, or `new` (an id generated here: nothing to load).
_STATE_SOURCE = Counter("ringiflow_command_state_total",
                        "Commands by where their aggregate's state came from", ["source"])
STATE_SOURCE = {source: _STATE_SOURCE.labels(source)
                for source in ("cached", "stale", "loaded", "new")}  # bound once: a hot path


class VersionConflict(AppError):
    """The aggregate is not at the version the caller expected (or another command
    changed it first); `current_version` says where it is."""

    code = "version_conflict"


class ReadsChanged(AppError):
    """What the command reads of other aggregates kept changing before it was appended."""

    code = "reads_changed"


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
class Writer:
    """Where commands are written: the pool of the command role, the process's
    cache of recently written aggregates (none: every command loads its stream), the
    bell that wakes the relay after each commit when the pool's connections leave
    that to it (none: the outbox trigger notifies inside the append), the cache
    of other aggregates' snapshots commands read (none: read every time), and the
    group commit that writes concurrent commands' appends in one transaction (none:
    each its own)."""

    pool: AsyncConnectionPool
    cache: StateCache[domain.AggregateState] | None = None
    bell: OutboxBell | None = None
    reads: StateCache[store.Snapshot] | None = None
    group: GroupCommit | None = None


@dataclass(frozen=True)
class Outcome:
    status_code: int
    body: dict[str, Any]
    replayed: bool = False


def envelopes_for(
    state: domain.AggregateState, events: list[domain.DomainEvent], ctx: CommandContext,
) -> tuple[list[EventEnvelope], domain.AggregateState]:
    """Number the events after the current version and attach the state after each;
    also the state after the last."""
    now = utcnow()
    out: list[EventEnvelope] = []
    aggregate_type = type(state).__name__.removesuffix("State").lower()
    # Built without a second validation: every value is made here, of the declared
    # types (the contract tests hold decide's payloads and snapshots to their models).
    metadata = EventMetadata.model_construct(
        tenant_id=ctx.principal.tenant_id, user_id=ctx.principal.user_id,
        correlation_id=ctx.correlation_id, causation_id=ctx.command_id,
        trace_id=ctx.trace_id, is_reconstructed=False)
    kind = AggregateType(aggregate_type)
    for event in events:
        state = domain.evolve(state, event)
        out.append(EventEnvelope.model_construct(
            event_id=uuid4(), event_type=event.event_type, schema_version=1,
            aggregate_type=kind, aggregate_id=state.id, version=state.version,
            occurred_at=now, payload=event.payload, aggregate=state.snapshot(),
            metadata=metadata))
    return out, state


async def execute(
    writer: Writer, ctx: CommandContext, aggregate_type: str, aggregate_id: UUID,
    build: BuildCommand, created_status: int = 200, *, new: bool = False,
) -> Outcome:
    """Decide on the aggregate's state and append, on an autocommit connection.

    The state comes from the writer's cache (one round trip when it is current), or is empty
    when `new` says the id was just generated here, or is loaded (two round
    trips). The append writes only at the version decided on; a cached copy that
    turns out stale is brought up to date and the command decided again, so a
    stale copy never refuses a command or writes one (ADR 0013). What `build`
    reads of other aggregates is held to the same rule (ADR 0016): the append
    writes only if each is still at the version read, and the command is built
    again from fresh reads if one moved on or cached ones refused it."""
    principal, tenant = ctx.principal, ctx.principal.tenant_id
    actor = domain.Actor(principal.user_id, principal.name, principal.roles)
    key = (tenant, aggregate_type, aggregate_id)
    cache = writer.cache
    async with writer.pool.connection() as conn:
        async def load() -> domain.AggregateState:
            return await store.load(conn, tenant, aggregate_type, aggregate_id)

        if ctx.idempotency_key:
            stored = await store.stored_response(conn, tenant, ctx.idempotency_key)
            if stored is not None:
                return _replay(stored, ctx)
        reads = Reads(conn, tenant, writer.reads)
        fresh_reads = 0

        async def build_again() -> domain.Command:
            nonlocal reads, fresh_reads
            reads, fresh_reads = reads.again(), fresh_reads + 1
            return await build(reads)

        try:
            command = await build(reads)
        except domain.DomainError:
            if not reads.cached:
                raise
            command = await build_again()
        cached = cache.get(key) if cache is not None else None
        # `current`: the state is the stream's head as of this command (not a copy).
        if cached is not None:
            state, current, source = cached, False, "cached"
        elif new:
            state, current, source = domain.initial_state(aggregate_type, aggregate_id), True, "new"
        else:
            state, current, source = await load(), True, "loaded"
        while True:
            expected = ctx.expected_version
            if not current and expected is not None and state.version != expected:
                state, current, source = await load(), True, "stale"
            if expected is not None and state.version != expected:
                raise _conflict(aggregate_type, aggregate_id, state.version,
                                f"expected version {expected}")
            try:
                events = domain.decide(command, state, actor, utcnow())
            except domain.DomainError:
                if not current:
                    state, current, source = await load(), True, "stale"
                elif reads.cached:
                    command = await build_again()
                else:
                    raise
                continue
            envelopes, after = envelopes_for(state, events, ctx)
            result = {
                "aggregate_type": aggregate_type, "aggregate_id": str(aggregate_id),
                "version": after.version, "event_ids": [str(e.event_id) for e in envelopes],
                "correlation_id": str(ctx.correlation_id), "command_id": str(ctx.command_id),
            }
            idempotency = None
            if ctx.idempotency_key:
                idempotency = {"key": ctx.idempotency_key, "request_hash": ctx.request_hash,
                               "status_code": created_status, "response": result}
            try:
                with _append_span(aggregate_type, after, envelopes):
                    append = store.append_of(tenant, aggregate_type, aggregate_id,
                                             state.version, envelopes, idempotency, reads.used)
                    appended = await (writer.group.append(conn, append) if writer.group
                                      else store.append(conn, append))
            except store.VersionConflict:
                if cache is not None:
                    cache.drop(key)
                head = await store.current_version(conn, tenant, aggregate_id)
                raise _conflict(aggregate_type, aggregate_id, head,
                                "another command changed it first") from None
            except store.ReadsMoved as moved:
                reads.forget()
                if fresh_reads >= FRESH_READ_ATTEMPTS:
                    raise ReadsChanged(
                        f"{moved}; what this command reads kept changing while it was decided "
                        f"({fresh_reads} fresh reads): retry it") from None
                command = await build_again()
                continue
            except store.IdempotencyKeyTaken:
                stored = await store.stored_response(conn, tenant, ctx.idempotency_key or "")
                assert stored is not None
                return _replay(stored, ctx)
            if isinstance(appended, int):
                if writer.bell is not None:
                    writer.bell.ring()
                STATE_SOURCE[source].inc()
                if cache is not None:
                    cache.put(key, after)
                return Outcome(created_status, response_body(result))
            if current or not appended:
                # Moved on after a real load: another command won the race, as before.
                if cache is not None:
                    cache.drop(key)
                raise _conflict(aggregate_type, aggregate_id, state.version + len(appended),
                                "another command changed it first")
            state, current, source = domain.fold(state, appended), True, "stale"


def _append_span(aggregate_type: str, after: domain.AggregateState,
                 envelopes: list[EventEnvelope]) -> AbstractContextManager[Any]:
    return tracing.span(f"append {aggregate_type}", lambda: {
        "ringiflow.aggregate_id": str(after.id), "ringiflow.version": after.version,
        "ringiflow.event_types": [e.event_type for e in envelopes]})


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

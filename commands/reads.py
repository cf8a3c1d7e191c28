"""What a command reads from other aggregates, checked where it is written (ADR 0016).

CreateWorkflow copies its definition's steps and the assignees' names into the
workflow; CreateDefinition and DelegateStep need their users registered. Those
snapshots come from the process's cache when it holds them all, else from one
read that refreshes the cache. Every snapshot a command is decided on is recorded
with its version, and the append writes only if each is still at that version
(`store.append_at`'s `reads`). When one moved on, or when a command decided on
cached snapshots is refused, it is built again from fresh reads: a cached
snapshot never decides what is written or refused, it only spares a round trip.

Only snapshots that exist are cached, so a refusal for a missing reference always
comes from a fresh read."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from uuid import UUID

from prometheus_client import Counter
from psycopg import AsyncConnection

from commands import store
from commands.cache import Key, StateCache
from commands.store import Snapshot
from contract import AggregateType

_READS = Counter("ringiflow_command_reads_total",
                 "Other aggregates' snapshots commands were decided on, by where they came "
                 "from (ADR 0016)", ["source"])
FROM_CACHE, FROM_DATABASE = _READS.labels("cached"), _READS.labels("read")


class Reads:
    """One attempt's reads. `used`: each aggregate read, at the version read."""

    def __init__(self, conn: AsyncConnection, tenant_id: UUID,
                 cache: StateCache[Snapshot] | None, *, fresh: bool = False) -> None:
        self.conn = conn
        self.tenant_id = tenant_id
        self.cache = cache
        self.fresh = fresh  # read the database even when the cache holds the snapshots
        self.used: dict[UUID, int] = {}
        self.cached = False  # some snapshot used came from the cache
        self._keys: list[Key] = []

    def again(self) -> Reads:
        """Reads for the next attempt: from the database, refreshing the cache."""
        return Reads(self.conn, self.tenant_id, self.cache, fresh=True)

    def forget(self) -> None:
        """Drop what this attempt read from the cache: one of them moved on."""
        if self.cache is not None:
            for key in self._keys:
                self.cache.drop(key)

    async def definition_with_assignees(
            self, definition_id: UUID) -> tuple[dict[str, Any] | None, dict[UUID, dict[str, Any]]]:
        """A definition's snapshot and its registered assignees' (by id)."""
        definition = self._cached(AggregateType.DEFINITION, [definition_id])
        if definition:
            assignees = {UUID(s["assignee_id"]) for s in definition[definition_id].state["steps"]}
            users = self._cached(AggregateType.USER, assignees)
            if users is not None:
                return (self._use(AggregateType.DEFINITION, definition, True)[definition_id],
                        self._use(AggregateType.USER, users, True))
        found, users = await store.definition_with_assignees(self.conn, self.tenant_id,
                                                             definition_id)
        if found is None:  # and so no assignees either
            return None, {}
        self._keep(AggregateType.USER, users)
        self._keep(AggregateType.DEFINITION, {definition_id: found})
        return (self._use(AggregateType.DEFINITION, {definition_id: found}, False)[definition_id],
                self._use(AggregateType.USER, users, False))

    async def users(self, ids: set[UUID]) -> dict[UUID, dict[str, Any]]:
        """The snapshots of those of `ids` that are registered users of the tenant."""
        cached = self._cached(AggregateType.USER, ids)
        if cached is not None:
            return self._use(AggregateType.USER, cached, True)
        found = await store.latest_snapshots(self.conn, self.tenant_id, AggregateType.USER, ids)
        self._keep(AggregateType.USER, found)
        return self._use(AggregateType.USER, found, False)

    def _cached(self, kind: AggregateType, ids: Iterable[UUID]) -> dict[UUID, Snapshot] | None:
        """All of `ids` from the cache, or None if it lacks one (or must not be used)."""
        if self.fresh or self.cache is None:
            return None
        out = {}
        for aggregate_id in ids:
            snapshot = self.cache.get((self.tenant_id, kind, aggregate_id))
            if snapshot is None:
                return None
            out[aggregate_id] = snapshot
        return out

    def _keep(self, kind: AggregateType, found: dict[UUID, Snapshot]) -> None:
        if self.cache is not None:
            for aggregate_id, snapshot in found.items():
                self.cache.put((self.tenant_id, kind, aggregate_id), snapshot)

    def _use(self, kind: AggregateType, snapshots: dict[UUID, Snapshot],
             cached: bool) -> dict[UUID, dict[str, Any]]:
        for aggregate_id, snapshot in snapshots.items():
            self.used[aggregate_id] = snapshot.version
            self._keys.append((self.tenant_id, kind, aggregate_id))
        (FROM_CACHE if cached else FROM_DATABASE).inc(len(snapshots))
        self.cached |= cached and bool(snapshots)
        return {aggregate_id: snapshot.state for aggregate_id, snapshot in snapshots.items()}

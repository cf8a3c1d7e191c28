"""`ringiflow replay` and `ringiflow verify`: the re-project and verify steps of
the resync runbook (seed 004), straight from the events table, so they work
even when Kafka no longer holds the history.

A scope (tenant, aggregate, time window) becomes a set of aggregates; each is
reset in the read model and re-projected from all of its events, in order, as
a replay (notifications stay quiet unless asked for)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row

from contract import EventEnvelope
from infra.settings import Settings, libpq_url
from projectors.catalogue import CATALOGUE
from projectors.projection import Delivery

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Scope:
    tenant: UUID | None = None
    aggregate: UUID | None = None
    since: datetime | None = None
    until: datetime | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses, params = ["true"], []
        for clause, value in (("tenant_id = %s", self.tenant),
                              ("aggregate_id = %s", self.aggregate),
                              ("occurred_at >= %s", self.since),
                              ("occurred_at < %s", self.until)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        return " AND ".join(clauses), params


@dataclass
class ReplayReport:
    aggregates: int = 0
    events: int = 0
    seconds: float = 0.0
    by_type: dict[str, int] = field(default_factory=dict)


def aggregates_in(settings: Settings, scope: Scope) -> dict[UUID, list[UUID]]:
    """The aggregates a scope touches, by tenant."""
    where, params = scope.where()
    with psycopg.connect(libpq_url(settings.require("database_url"))) as conn:
        rows = conn.execute("SELECT DISTINCT tenant_id, aggregate_id FROM event_store.events "
                            f"WHERE {where}", params).fetchall()
    by_tenant: dict[UUID, list[UUID]] = {}
    for tenant, aggregate in rows:
        by_tenant.setdefault(tenant, []).append(aggregate)
    return by_tenant


def replay(settings: Settings, group: str, scope: Scope, dry_run: bool = False,
           batch: int = 500, progress: Progress = lambda _m: None) -> ReplayReport:
    by_tenant = aggregates_in(settings, scope)
    ids = [a for aggregates in by_tenant.values() for a in aggregates]
    report = ReplayReport(aggregates=len(ids))
    with psycopg.connect(libpq_url(settings.require("database_url")),
                         row_factory=dict_row) as conn:
        counts = conn.execute(
            "SELECT event_type, count(*) AS n FROM event_store.events "
            "WHERE aggregate_id = ANY(%s) GROUP BY 1", (ids,)).fetchall()
    report.by_type = {r["event_type"]: r["n"] for r in counts}
    report.events = sum(report.by_type.values())
    if dry_run or not ids:
        return report
    started = time.monotonic()

    async def run() -> None:
        projection = CATALOGUE[group](settings)
        store = projection.store
        await store.start()
        try:
            # Stores that can forget an aggregate are rewritten from scratch; the
            # others (version-guarded) re-apply whatever they lack.
            reset = getattr(store, "reset", None)
            if reset is not None:
                await reset(by_tenant)
            done = 0
            with psycopg.connect(libpq_url(settings.require("database_url")),
                                 row_factory=dict_row) as conn:
                cur = conn.cursor(name="replay")  # server-side: any size of scope
                cur.execute(
                    "SELECT event_id, event_type, schema_version, aggregate_type, aggregate_id, "
                    "version, occurred_at, payload, aggregate, metadata FROM event_store.events "
                    "WHERE aggregate_id = ANY(%s) ORDER BY position", (ids,))
                while rows := cur.fetchmany(batch):
                    deliveries = [Delivery(EventEnvelope.model_validate(r), replay=True)
                                  for r in rows]
                    deliveries = [d for d in deliveries
                                  if projection.handles(d.envelope.event_type)]
                    if deliveries:
                        await store.apply(deliveries)
                    done += len(rows)
                    elapsed = time.monotonic() - started
                    rate = done / elapsed if elapsed else 0
                    eta = (report.events - done) / rate if rate else 0
                    progress(f"{done}/{report.events} events, {rate:,.0f}/s, ETA {eta:.0f} s")
        finally:
            await store.close()

    asyncio.run(run())
    report.seconds = time.monotonic() - started
    return report


@dataclass(frozen=True)
class Difference:
    aggregate_id: UUID
    field: str
    expected: Any
    actual: Any


def verify_workflows(settings: Settings, tenant: UUID | None = None) -> list[Difference]:
    """Compare workflow_read_models with the newest snapshot of every workflow in
    the events table."""
    where = "e.aggregate_type = 'workflow'" + (" AND e.tenant_id = %s" if tenant else "")
    params = [tenant] if tenant else []
    with psycopg.connect(libpq_url(settings.require("database_url")),
                         row_factory=dict_row) as conn:
        expected = conn.execute(
            "SELECT DISTINCT ON (e.aggregate_id) e.aggregate_id, e.version, e.aggregate "
            f"FROM event_store.events e WHERE {where} ORDER BY e.aggregate_id, e.version DESC",
            params).fetchall()
        actual = {r["id"]: r for r in conn.execute(
            "SELECT id, status, title, priority, last_event_version, current_assignee_id "
            "FROM read_model.workflow_read_models" + (" WHERE tenant_id = %s" if tenant else ""),
            params).fetchall()}
    differences = []
    for row in expected:
        snapshot, wid = row["aggregate"], row["aggregate_id"]
        have = actual.pop(wid, None)
        if have is None:
            differences.append(Difference(wid, "row", "present", "missing"))
            continue
        wanted = {"last_event_version": row["version"], "status": snapshot["status"],
                  "title": snapshot["title"], "priority": snapshot["priority"],
                  "current_assignee_id": snapshot.get("current_assignee_id")}
        for name, value in wanted.items():
            got = have[name]
            if (str(got) if got is not None else None) != (str(value) if value is not None
                                                           else None):
                differences.append(Difference(wid, name, value, got))
    differences += [Difference(wid, "row", "absent", "present") for wid in actual]
    return differences

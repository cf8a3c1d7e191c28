"""Re-projecting a scope of aggregates from the events table (`ringiflow replay`): the
re-project step of the resync runbook (docs/RUNBOOK.md). Each aggregate the scope
touches is forgotten by the read model and re-projected from all of its events, in
order, as a replay (notifications stay quiet unless asked for)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from psycopg.rows import dict_row

from contract import stored_envelope
from infra.settings import Settings, libpq_url
from operations.scope import Scope, aggregates_in, newest_snapshots
from projectors.catalogue import CATALOGUE, versioned
from projectors.projection import Delivery

Progress = Callable[[str], None]


@dataclass
class ReplayReport:
    aggregates: int = 0
    events: int = 0
    seconds: float = 0.0
    by_type: dict[str, int] = field(default_factory=dict)


def replay(settings: Settings, group: str, scope: Scope, dry_run: bool = False,
           batch: int = 500, progress: Progress = lambda _m: None) -> ReplayReport:
    by_tenant = aggregates_in(settings, scope)
    # Aggregate ids are unique per tenant only: select streams by (tenant, id).
    tenants = [t for t, aggregates in by_tenant.items() for _ in aggregates]
    ids = [a for aggregates in by_tenant.values() for a in aggregates]
    streams = ("JOIN unnest(%s::uuid[], %s::uuid[]) AS s(tenant, id) "
               "ON e.tenant_id = s.tenant AND e.aggregate_id = s.id")
    report = ReplayReport(aggregates=len(ids))
    with psycopg.connect(libpq_url(settings.require("database_url")),
                         row_factory=dict_row) as conn:
        counts = conn.execute(
            f"SELECT e.event_type, count(*) AS n FROM event_store.events e {streams} "
            "GROUP BY 1", (tenants, ids)).fetchall()
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
            versions_of = versioned(group)
            if versions_of is not None:  # a read model starts over; topics are re-derived
                versions = versions_of(settings)
                try:
                    await versions.forget(by_tenant, newest_snapshots(settings, Scope(
                        aggregates=tuple(ids))))
                finally:
                    await versions.close()
            done = 0
            with psycopg.connect(libpq_url(settings.require("database_url")),
                                 row_factory=dict_row) as conn:
                cur = conn.cursor(name="replay")  # server-side: any size of scope
                cur.execute(
                    "SELECT e.event_id, e.event_type, e.schema_version, e.aggregate_type, "
                    "e.aggregate_id, e.version, e.occurred_at, e.payload, e.aggregate, "
                    f"e.metadata FROM event_store.events e {streams} ORDER BY e.position",
                    (tenants, ids))
                while rows := cur.fetchmany(batch):
                    deliveries = [Delivery(stored_envelope(r), replay=True)
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

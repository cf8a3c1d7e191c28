"""Which aggregates an operation covers (tenant, aggregates, time window), and what the
events table says of them: the source of truth every replay, rebuild and verify reads
(it keeps the whole history, even when Kafka no longer does)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row

from infra.settings import Settings, libpq_url


@dataclass(frozen=True)
class Scope:
    tenant: UUID | None = None
    aggregates: tuple[UUID, ...] | None = None
    since: datetime | None = None
    until: datetime | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses, params = ["true"], []
        for clause, value in (("tenant_id = %s", self.tenant),
                              ("aggregate_id = ANY(%s)",
                               list(self.aggregates) if self.aggregates else None),
                              ("occurred_at >= %s", self.since),
                              ("occurred_at < %s", self.until)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        return " AND ".join(clauses), params


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


def newest_snapshots(settings: Settings, scope: Scope) -> list[dict[str, Any]]:
    """tenant_id, aggregate_id, version and snapshot of each workflow's newest event."""
    where, params = scope.where()
    with psycopg.connect(libpq_url(settings.require("database_url")),
                         row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT DISTINCT ON (aggregate_id) tenant_id, aggregate_id, version, aggregate "
            f"FROM event_store.events WHERE aggregate_type = 'workflow' AND {where} "
            "ORDER BY aggregate_id, version DESC", params).fetchall()

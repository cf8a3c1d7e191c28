"""What each console page shows, gathered from `operations` and the stores (blocking:
the app runs these in threads). A tenant admin's views are cut to its tenant here."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import httpx
import psycopg
from psycopg.rows import dict_row

from console.session import Session
from infra.settings import Settings, libpq_url
from operations import dlq, lag
from operations.audit import recent_actions
from ringiflow.components import COMPONENTS


def processes(settings: Settings) -> list[dict[str, Any]]:
    """Each application process's readiness, and the servers it depends on."""
    out = []
    for component in COMPONENTS.values():
        if component.name == "console":
            continue
        stalled: list[str] = []
        try:
            answer = httpx.get(component.url(settings) + "/readyz", timeout=2)
            body = answer.json()
            status, dependencies = body.get("status", "?"), body.get("dependencies", {})
            for group, worker in (body.get("workers") or {}).items():  # `run workers`
                dependencies[group] = worker.get("status", "?")
                stalled += [f"{group}: {s}" for s in worker.get("stalled_partitions", [])]
        except (httpx.HTTPError, ValueError):
            status, dependencies = "unreachable", {}
        out.append({"name": component.name, "url": component.url(settings), "status": status,
                    "dependencies": dependencies, "stalled": stalled})
    return out


def overview(settings: Settings, session: Session) -> dict[str, Any]:
    report = lag.report(settings)
    groups: dict[str, dict[str, Any]] = {}
    for p in report.partitions:
        g = groups.setdefault(p.group, {"group": p.group, "lag": 0, "oldest_event_age_s": None,
                                        "partitions": 0, "parked": report.parked.get(p.group, 0),
                                        "apply_delay": (report.apply_delays or {}).get(p.group)})
        g["lag"] += p.lag
        g["partitions"] += 1
        if p.event_age_s is not None:
            g["oldest_event_age_s"] = max(g["oldest_event_age_s"] or 0, p.event_age_s)
    dead = {d["group"]: d for d in dlq.summary(settings, dlq.Filters())}
    for name, g in groups.items():
        g["dead_letters"] = dead.get(name, {}).get("records", 0) if session.everything else None
    return {"processes": processes(settings), "groups": list(groups.values()),
            "partitions": [vars(p) for p in report.partitions if p.lag],
            "outbox": {"pending": report.outbox_pending, "failed": report.outbox_failed,
                       "oldest_pending_s": report.oldest_pending_s},
            "at": datetime.now().astimezone().isoformat(timespec="seconds")}


def dead_letters(settings: Settings, session: Session, filters: dlq.Filters,
                 tenant: str | None) -> dict[str, Any]:
    """The records (newest last) and the parked aggregates the session may see."""
    def visible(row_tenant: Any) -> bool:
        return session.may_see(row_tenant) and (tenant is None or str(row_tenant) == tenant)

    records = [r for r in dlq.records(settings, filters)
               if visible(r["tenant_id"]) or (session.everything and tenant is None)]
    parked = [p for p in dlq.parked(settings, filters) if visible(p["tenant_id"])]
    return {"records": records[-200:], "parked": parked,
            "groups": dlq.summary(settings, filters) if session.everything else []}


def audit(settings: Settings, session: Session) -> list[dict[str, Any]]:
    rows = recent_actions(settings)
    if session.everything:
        return rows
    mine = f"@{session.principal.tenant_id}>"
    return [r for r in rows if mine in r["operator"]]


def events(settings: Settings, session: Session, tenant: UUID, aggregate: UUID | None,
           correlation: UUID | None, as_of: datetime | None) -> dict[str, Any]:
    """An aggregate's events in order (or a correlation's, across aggregates), each with
    the snapshot after it; up to `as_of` when given; and each read model's copy."""
    if not session.may_see(tenant):
        return {"events": [], "read_models": {}, "refused": "another tenant's events"}
    where, params = ["tenant_id = %s"], [tenant]
    if aggregate:
        where.append("aggregate_id = %s")
        params.append(aggregate)
    if correlation:
        where.append("metadata->>'correlation_id' = %s")
        params.append(str(correlation))
    if as_of:
        where.append("occurred_at <= %s")
        params.append(as_of)
    with psycopg.connect(libpq_url(settings.require("database_url")),
                         row_factory=dict_row) as conn:
        rows = conn.execute(
            "SELECT event_id, aggregate_type, aggregate_id, version, event_type, occurred_at, "
            "payload, aggregate, metadata FROM event_store.events WHERE "
            + " AND ".join(where) + " ORDER BY position LIMIT 1000", params).fetchall()
        copies = read_model_copies(settings, conn, tenant, aggregate) \
            if aggregate and rows and rows[-1]["aggregate_type"] == "workflow" else {}
    newest = rows[-1]["version"] if rows else None
    for store in copies.values():
        store["behind"] = store["version"] is not None and newest is not None and \
            not as_of and store["version"] < newest
    return {"events": rows, "read_models": copies}


def read_model_copies(settings: Settings, conn: psycopg.Connection, tenant: UUID,
                      workflow: UUID) -> dict[str, dict[str, Any]]:
    """The version each read model holds of a workflow (None: it has none)."""
    import redis

    from projectors.cache.layout import NAMESPACE_KEY, versions_key

    row = conn.execute("SELECT last_event_version FROM read_model.workflow_read_models "
                       "WHERE tenant_id = %s AND id = %s", (tenant, workflow)).fetchone()
    out: dict[str, dict[str, Any]] = {"postgres": {"version": row["last_event_version"]
                                                   if row else None}}
    try:
        client = redis.Redis.from_url(settings.require("redis_url"), socket_timeout=2)
        namespace = (client.get(NAMESPACE_KEY) or b"").decode()
        cached = client.hget(versions_key(namespace, tenant), str(workflow))
        out["redis"] = {"version": int(cached) if cached else None}
    except redis.RedisError as exc:
        out["redis"] = {"version": None, "error": str(exc)}
    try:
        found = httpx.get(f"{settings.require('opensearch_url')}/{settings.search_alias}"
                          f"/_doc/{workflow}", timeout=2)
        source = found.json().get("_source") if found.status_code == 200 else None
        out["opensearch"] = {"version": source.get("version") if source else None}
    except (httpx.HTTPError, ValueError) as exc:
        out["opensearch"] = {"version": None, "error": str(exc)}
    return out

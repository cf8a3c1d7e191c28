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
from datetime import UTC, date, datetime
from typing import Any
from uuid import UUID

import orjson
import psycopg
from psycopg.rows import dict_row

from contract import stored_envelope
from infra.clients import opensearch_client, redis_client
from infra.settings import Settings, libpq_url
from projectors.cache_store import LIVE, NAMESPACE_KEY, RESOLVE_NAMESPACE, live_namespace
from projectors.catalogue import CATALOGUE
from projectors.projection import Delivery

Progress = Callable[[str], None]


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


@dataclass(frozen=True)
class Difference:
    aggregate_id: UUID  # for a tenant-wide counter: the tenant
    field: str
    expected: Any
    actual: Any


def _newest_snapshots(settings: Settings, scope: Scope) -> list[dict[str, Any]]:
    """tenant_id, aggregate_id, version and snapshot of each workflow's newest event."""
    where, params = scope.where()
    with psycopg.connect(libpq_url(settings.require("database_url")),
                         row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT DISTINCT ON (aggregate_id) tenant_id, aggregate_id, version, aggregate "
            f"FROM event_store.events WHERE aggregate_type = 'workflow' AND {where} "
            "ORDER BY aggregate_id, version DESC", params).fetchall()


def _compare(rows: list[dict[str, Any]], actual: dict[UUID, dict[str, Any]], kind: str,
             wanted: Callable[[dict[str, Any]], dict[str, Any]]) -> list[Difference]:
    """Each workflow's expected fields against the read model's copy (consumed from
    `actual`); copies with no workflow behind them are differences too."""
    differences = []
    for row in rows:
        wid = row["aggregate_id"]
        have = actual.pop(wid, None)
        if have is None:
            differences.append(Difference(wid, kind, "present", "missing"))
            continue
        differences += [Difference(wid, name, value, have.get(name))
                        for name, value in wanted(row).items()
                        if not _same(have.get(name), value)]
    return differences + [Difference(wid, kind, "absent", "present") for wid in actual]


def _same(a: Any, b: Any) -> bool:
    return (str(a) if a is not None else None) == (str(b) if b is not None else None)


# History rows the events table implies and the read model lacks, and the reverse.
HISTORY_GAPS = """
SELECT e.aggregate_id, e.version, 'missing' AS state FROM event_store.events e
WHERE e.aggregate_type = 'workflow' AND (%(tenant)s::uuid IS NULL OR e.tenant_id = %(tenant)s)
  AND NOT EXISTS (SELECT 1 FROM read_model.workflow_history h WHERE h.event_id = e.event_id)
UNION ALL
SELECT h.workflow_id, h.version, 'unexpected' FROM read_model.workflow_history h
WHERE (%(tenant)s::uuid IS NULL OR h.tenant_id = %(tenant)s)
  AND NOT EXISTS (SELECT 1 FROM event_store.events e WHERE e.event_id = h.event_id
                  AND e.aggregate_id = h.workflow_id AND e.version = h.version)
ORDER BY 1, 2
"""


def verify_workflows(settings: Settings, tenant: UUID | None = None) -> list[Difference]:
    """Compare everything workflow-projector holds with the events table: each
    workflow row, its steps and open tasks with the workflow's newest snapshot,
    its history with its events (one row each), and the users and definitions
    with theirs."""
    where = " WHERE tenant_id = %s" if tenant else ""
    args = [tenant] if tenant else []
    with psycopg.connect(libpq_url(settings.require("database_url")),
                         row_factory=dict_row) as conn:
        actual = {r["id"]: r for r in conn.execute(
            "SELECT id, status, title, priority, last_event_version, current_assignee_id "
            "FROM read_model.workflow_read_models" + where, args).fetchall()}
        steps: dict[UUID, dict[str, Any]] = {}
        for r in conn.execute("SELECT workflow_id, step_id, status, assignee_id, step_order "
                              "FROM read_model.workflow_steps" + where, args).fetchall():
            steps.setdefault(r["workflow_id"], {})[str(r["step_id"])] = \
                (r["status"], str(r["assignee_id"]), r["step_order"])
        tasks: dict[UUID, set[tuple[str, str]]] = {}
        for r in conn.execute("SELECT workflow_id, step_id, assignee_id "
                              "FROM read_model.my_tasks" + where, args).fetchall():
            tasks.setdefault(r["workflow_id"], set()).add((str(r["step_id"]),
                                                           str(r["assignee_id"])))
        gaps = conn.execute(HISTORY_GAPS, {"tenant": tenant}).fetchall()
        others = {(kind, r["tenant_id"], r["id"]): r["version"]
                  for kind in ("users", "definitions")
                  for r in conn.execute(f"SELECT tenant_id, id, version FROM read_model.{kind}"
                                        + where, args).fetchall()}
        scope_where, scope_params = Scope(tenant).where()
        newest = conn.execute(
            "SELECT DISTINCT ON (tenant_id, aggregate_id) aggregate_type, tenant_id, "
            "aggregate_id, version FROM event_store.events "
            f"WHERE aggregate_type IN ('user', 'definition') AND {scope_where} "
            "ORDER BY tenant_id, aggregate_id, version DESC", scope_params).fetchall()
    snapshots = _newest_snapshots(settings, Scope(tenant))
    differences = _compare(snapshots, actual, "row", lambda row: {
        "last_event_version": row["version"], "status": row["aggregate"]["status"],
        "title": row["aggregate"]["title"], "priority": row["aggregate"]["priority"],
        "current_assignee_id": row["aggregate"].get("current_assignee_id")})
    for row in snapshots:
        wid, snapshot = row["aggregate_id"], row["aggregate"]
        wanted = {str(st["step_id"]): (st["status"], str(st.get("assignee_id")), st["order"])
                  for st in snapshot.get("steps", [])}
        if steps.pop(wid, {}) != wanted:
            differences.append(Difference(wid, "steps", sorted(wanted.items()),
                                          "different (status, assignee or order)"))
        open_tasks = {(str(st["step_id"]), str(st.get("assignee_id")))
                      for st in snapshot.get("steps", [])
                      if snapshot["status"] == "in_progress" and st["status"] == "pending"}
        have = tasks.pop(wid, set())
        if have != open_tasks:
            differences.append(Difference(wid, "my_tasks", sorted(open_tasks), sorted(have)))
    differences += [Difference(wid, "steps", "absent", "present") for wid in steps]
    differences += [Difference(wid, "my_tasks", "absent", sorted(t)) for wid, t in tasks.items()]
    differences += [Difference(r["aggregate_id"], "history", f"v{r['version']} "
                               + ("present" if r["state"] == "missing" else "absent"),
                               r["state"]) for r in gaps]
    return differences + _verify_versions(newest, others)


def _verify_versions(newest: list[dict[str, Any]],
                     actual: dict[tuple[str, UUID, UUID], int]) -> list[Difference]:
    """Users and definitions: the row's version is the newest event's (ids are
    unique per tenant only)."""
    differences = []
    for row in newest:
        kind = "users" if row["aggregate_type"] == "user" else "definitions"
        have = actual.pop((kind, row["tenant_id"], row["aggregate_id"]), None)
        if have != row["version"]:
            differences.append(Difference(row["aggregate_id"], f"{kind}.version",
                                          row["version"], have))
    return differences + [Difference(aid, f"{kind}.version", "absent", version)
                          for (kind, _tenant, aid), version in actual.items()]


def _counters(rows: list[dict[str, Any]], today: date) -> dict[UUID, dict[str, int]]:
    """The dashboard counters the snapshots imply, per tenant (SPEC §4)."""
    out: dict[UUID, dict[str, int]] = {}
    for row in rows:
        counters = out.setdefault(row["tenant_id"], {"pending": 0, "completed_today": 0})
        snapshot = row["aggregate"]
        if snapshot["status"] == "in_progress":
            counters["pending"] += 1
        done = snapshot.get("completed_at")
        if snapshot["status"] in ("approved", "rejected") and done and \
                datetime.fromisoformat(done).astimezone(UTC).date() == today:
            counters["completed_today"] += 1
    return out


async def _verify_cache(settings: Settings, tenant: UUID | None) -> list[Difference]:

    rows = _newest_snapshots(settings, Scope(tenant))
    today = datetime.now(UTC).date()
    client = redis_client(settings.require("redis_url"))
    try:
        ns = await live_namespace(client)
        tenants = {r["tenant_id"] for r in rows} | ({tenant} if tenant else set())
        actual: dict[UUID, dict[str, Any]] = {}
        for t in tenants:
            statuses = await client.hgetall(f"{ns}wfstatus:{t}")
            for wid, version in (await client.hgetall(f"{ns}wfver:{t}")).items():
                actual[UUID(wid.decode())] = {"version": int(version),
                                              "status": (statuses.get(wid) or b"").decode()
                                              or None}
        differences = _compare(rows, actual, "cached", lambda row: {
            "version": row["version"], "status": row["aggregate"]["status"]})
        expected = _counters(rows, today)
        for t in tenants:
            pending = int(await client.hget(f"{ns}stats:{t}", "pending") or 0)
            completed = int(await client.get(f"{ns}stats:{t}:completed:{today}") or 0)
            wanted = expected.get(t, {"pending": 0, "completed_today": 0})
            if pending != wanted["pending"]:
                differences.append(Difference(t, "stats.pending", wanted["pending"], pending))
            if completed != wanted["completed_today"]:
                differences.append(Difference(t, "stats.completed_today",
                                              wanted["completed_today"], completed))
    finally:
        await client.aclose()
    return differences


async def _search_documents(client: Any, alias: str,
                            tenant: UUID | None) -> dict[UUID, dict[str, Any]]:
    query: dict[str, Any] = {"term": {"tenant_id": str(tenant)}} if tenant \
        else {"match_all": {}}
    found: dict[UUID, dict[str, Any]] = {}
    after: list[Any] | None = None
    while True:
        body: dict[str, Any] = {"query": query, "size": 1000, "sort": [{"workflow_id": "asc"}],
                                "_source": ["workflow_id", "tenant_id", "version", "status"]}
        if after:
            body["search_after"] = after
        hits = (await client.search(index=alias, body=body))["hits"]["hits"]
        for hit in hits:
            found[UUID(hit["_source"]["workflow_id"])] = hit["_source"]
        if len(hits) < 1000:
            return found
        after = hits[-1]["sort"]


async def _verify_search(settings: Settings, tenant: UUID | None) -> list[Difference]:
    client = opensearch_client(settings.require("opensearch_url"))
    try:
        await client.indices.refresh(index=settings.search_alias)
        actual = await _search_documents(client, settings.search_alias, tenant)
    finally:
        await client.close()
    return _compare(_newest_snapshots(settings, Scope(tenant)), actual, "document",
                    lambda row: {"version": row["version"],
                                 "status": row["aggregate"]["status"]})


VERIFIABLE = ("workflow-projector", "cache-projector", "search-indexer")


def verify(settings: Settings, projector: str, tenant: UUID | None = None) -> list[Difference]:
    if projector == "workflow-projector":
        return verify_workflows(settings, tenant)
    if projector == "cache-projector":
        return asyncio.run(_verify_cache(settings, tenant))
    if projector == "search-indexer":
        return asyncio.run(_verify_search(settings, tenant))
    raise ValueError(f"verify compares read models; {projector} writes topics. Verify one of "
                     f"{', '.join(VERIFIABLE)}")


def repair(settings: Settings, projector: str, tenant: UUID | None,
           differences: list[Difference]) -> list[UUID]:
    """Forget exactly the aggregates that differ and replay them from the events
    table; for the cache, then recount the tenants' pending counter from the
    cache's own per-workflow statuses."""
    ids = tuple(sorted({d.aggregate_id for d in differences
                        if not d.field.startswith("stats.")}, key=str))
    by_tenant = aggregates_in(settings, Scope(aggregates=ids)) if ids else {}
    asyncio.run(_forget(settings, projector, by_tenant))
    if ids:
        replay(settings, projector, Scope(tenant=tenant, aggregates=ids))
    if projector == "cache-projector":
        tenants = {d.aggregate_id for d in differences if d.field.startswith("stats.")}
        tenants |= set(by_tenant)
        skewed_days = {d.aggregate_id for d in differences
                       if d.field == "stats.completed_today"}
        asyncio.run(_recount(settings, tenants, skewed_days, tenant))
    return list(ids)


async def _forget(settings: Settings, projector: str,
                  by_tenant: dict[UUID, list[UUID]]) -> None:
    """A cached copy with a wrong, higher version would shadow the replay: drop it
    first, taking it out of the counters it was in, so the replay counts it once.
    (The PostgreSQL store does this itself in replay.)"""
    if projector == "cache-projector":

        ids = tuple(wid for wids in by_tenant.values() for wid in wids)
        newest = {r["aggregate_id"]: r["aggregate"]
                  for r in _newest_snapshots(settings, Scope(aggregates=ids))}
        client = redis_client(settings.require("redis_url"))
        try:
            ns = await live_namespace(client)
            for t, wids in by_tenant.items():
                for wid in wids:
                    status = await client.hget(f"{ns}wfstatus:{t}", str(wid))
                    if status == b"in_progress":
                        await client.hincrby(f"{ns}stats:{t}", "pending", -1)
                    elif status in (b"approved", b"rejected"):
                        cached = await client.get(f"{ns}workflow:{t}:{wid}")
                        done = (orjson.loads(cached) if cached else newest.get(wid, {})) \
                            .get("completed_at")
                        day = f"{ns}stats:{t}:completed:{_day_of(done)}"
                        if done and await client.exists(day):
                            await client.decr(day)
                    await client.hdel(f"{ns}wfver:{t}", str(wid))
                    await client.hdel(f"{ns}wfstatus:{t}", str(wid))
                    await client.zrem(f"{ns}overdue:{t}", str(wid))
                    await client.delete(f"{ns}workflow:{t}:{wid}")
        finally:
            await client.aclose()
    # The search index needs no forgetting: a missing or older document is
    # overwritten by the replay. One with a *newer* external version than the
    # event store cannot be, by design of external versioning; a deleted one
    # leaves a tombstone with a newer version too. Those need a rebuild.


def _day_of(timestamp: str | None) -> str:
    return datetime.fromisoformat(timestamp).astimezone(UTC).date().isoformat() \
        if timestamp else "none"


# Pending is a function of the statuses the cache holds; counted inside Redis,
# atomically with respect to the projector's own scripts, so it cannot drift
# against events the projector applies meanwhile.
RECOUNT_PENDING = RESOLVE_NAMESPACE + """
local n = 0
for _, status in ipairs(redis.call('HVALS', ns .. 'wfstatus:' .. ARGV[2])) do
    if status == 'in_progress' then n = n + 1 end
end
redis.call('HSET', ns .. 'stats:' .. ARGV[2], 'pending', n)
return n
"""


async def _recount(settings: Settings, tenants: set[UUID], skewed_days: set[UUID],
                   scope: UUID | None) -> None:

    client = redis_client(settings.require("redis_url"))
    try:
        recount = client.register_script(RECOUNT_PENDING)
        for t in tenants:
            await recount(keys=[NAMESPACE_KEY], args=[LIVE, str(t)])
        if skewed_days:
            # Completion days are not kept per workflow in the cache: today's
            # counter is set from the events table (exact when the projector is
            # caught up, which is when verify is meant to run).
            today = datetime.now(UTC).date()
            counted = _counters(_newest_snapshots(settings, Scope(scope)), today)
            ns = await live_namespace(client)
            for t in skewed_days:
                await client.set(f"{ns}stats:{t}:completed:{today}",
                                 counted.get(t, {}).get("completed_today", 0), ex=8 * 86400)
    finally:
        await client.aclose()

"""The PostgreSQL read model's versions (ADR 0005): `read_model_vN` schemas, with the
`read_model` views over the live one; built, switched, verified and repaired here."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from projectors.projection import Store
from projectors.versioned import (
    ByTenant,
    Difference,
    Newest,
    RefusedCutOver,
    VersionedStore,
    compare,
)
from projectors.workflows.store import WorkflowStore

READ_MODEL_TABLES = ("workflow_read_models", "workflow_steps", "workflow_history", "my_tasks",
                     "users", "definitions")
# What forgetting an aggregate deletes: each table and its aggregate id column.
AGGREGATE_COLUMNS = (("workflow_steps", "workflow_id"), ("my_tasks", "workflow_id"),
                     ("workflow_history", "workflow_id"), ("workflow_read_models", "id"),
                     ("users", "id"), ("definitions", "id"))

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



class TableVersions(VersionedStore):
    """`read_model_vN` schemas; `read_model` holds views over the live one."""

    projector = "workflow-projector"
    aggregate_types = ("workflow", "definition", "user")

    def _connect(self, **kwargs: Any) -> psycopg.Connection:
        return psycopg.connect(self.database_url, **kwargs)

    async def live(self) -> str | None:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT DISTINCT n.nspname FROM pg_rewrite r "
                "JOIN pg_depend d ON d.objid = r.oid "
                "JOIN pg_class c ON c.oid = d.refobjid AND c.oid <> r.ev_class "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE r.ev_class = 'read_model.workflow_read_models'::regclass").fetchone()
        return row[0] if row else None

    async def existing(self) -> list[str]:
        with self._connect() as conn:
            return [r[0] for r in conn.execute(
                r"SELECT nspname FROM pg_namespace WHERE nspname ~ '^read_model_v\d+$'")]

    def named(self, number: int) -> str:
        return f"read_model_v{number}"

    async def create(self, target: str, live: str | None) -> None:
        """Same tables, indexes, row-level security and grants as the live version,
        empty; in one transaction, so a crash leaves all of it or nothing."""
        source = live or "read_model_v1"
        with self._connect() as conn, conn.transaction():
            schema = sql.Identifier(target)
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO ringiflow_projector, "
                                 "ringiflow_query").format(schema))
            for table in READ_MODEL_TABLES:
                new = sql.Identifier(target, table)
                conn.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(
                    new, sql.Identifier(source, table)))
                conn.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(new))
                conn.execute(sql.SQL("ALTER TABLE {} FORCE ROW LEVEL SECURITY").format(new))
                policies = conn.execute(
                    "SELECT policyname, permissive, roles, cmd, qual, with_check "
                    "FROM pg_policies WHERE schemaname = %s AND tablename = %s",
                    (source, table)).fetchall()
                for name, permissive, roles, cmd, qual, check in policies:
                    to = sql.SQL(", ").join(sql.SQL("PUBLIC") if r == "public"
                                            else sql.Identifier(r) for r in roles)
                    statement = sql.SQL("CREATE POLICY {} ON {} AS {} FOR {} TO {}").format(
                        sql.Identifier(name), new, sql.SQL(permissive), sql.SQL(cmd), to)
                    if qual:
                        statement += sql.SQL(" USING ({})").format(sql.SQL(qual))
                    if check:
                        statement += sql.SQL(" WITH CHECK ({})").format(sql.SQL(check))
                    conn.execute(statement)
                conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO "
                                     "ringiflow_projector").format(new))
                conn.execute(sql.SQL("GRANT SELECT ON {} TO ringiflow_query").format(new))

    def store(self, target: str) -> Store:
        return WorkflowStore(self.database_url, schema=target)

    async def count(self, target: str) -> int:
        with self._connect() as conn:
            return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                sql.Identifier(target, "workflow_read_models"))).fetchone()[0]  # type: ignore[index]

    async def cut_over(self, target: str, live: str | None) -> None:
        """Replace every view in one transaction. All six locks are taken by one
        statement bounded below deadlock_timeout: if it collides with readers or
        the live projector, it is this transaction that gives up (and tries
        again), never their statements, and nobody queues behind it for long."""
        views = sql.SQL(", ").join(sql.Identifier("read_model", t) for t in READ_MODEL_TABLES)
        for attempt in range(40):
            try:
                with self._connect() as conn, conn.transaction():
                    conn.execute("SET LOCAL statement_timeout = '300ms'")
                    conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(views))
                    conn.execute("SET LOCAL statement_timeout = 0")
                    for table in READ_MODEL_TABLES:
                        conn.execute(sql.SQL(
                            "CREATE OR REPLACE VIEW {} WITH (security_invoker = true) AS "
                            "SELECT * FROM {}").format(sql.Identifier("read_model", table),
                                                       sql.Identifier(target, table)))
                return
            except (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable):
                await asyncio.sleep(0.05 * (attempt + 1))
        raise RefusedCutOver("could not replace the read_model views: readers or the live "
                             "projector held them for 40 attempts; retry when quieter")

    async def drop(self, version: str) -> None:
        # RESTRICT: if the read_model views still used these tables, this fails
        # instead of taking the views with it.
        with self._connect() as conn, conn.transaction():
            tables = sql.SQL(", ").join(sql.Identifier(version, t) for t in READ_MODEL_TABLES)
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {} RESTRICT").format(tables))
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} RESTRICT").format(
                sql.Identifier(version)))

    async def verify(self, newest: Newest, tenant: UUID | None) -> list[Difference]:
        """Everything workflow-projector holds against the events table: each workflow
        row, its steps and open tasks against the workflow's newest snapshot, its history
        against its events (one row each), users and definitions against theirs."""
        return await asyncio.to_thread(self._verify, newest, tenant)

    def _verify(self, snapshots: Newest, tenant: UUID | None) -> list[Difference]:
        where = " WHERE tenant_id = %s" if tenant else ""
        args = [tenant] if tenant else []
        with self._connect(row_factory=dict_row) as conn:
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
                      for r in conn.execute(
                          f"SELECT tenant_id, id, version FROM read_model.{kind}" + where,
                          args).fetchall()}
            newest = conn.execute(
                "SELECT DISTINCT ON (tenant_id, aggregate_id) aggregate_type, tenant_id, "
                "aggregate_id, version FROM event_store.events "
                "WHERE aggregate_type IN ('user', 'definition')" + where.replace("WHERE", "AND")
                + " ORDER BY tenant_id, aggregate_id, version DESC", args).fetchall()
        differences = compare(snapshots, actual, "row", lambda row: {
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
        differences += [Difference(wid, "my_tasks", "absent", sorted(t))
                        for wid, t in tasks.items()]
        differences += [Difference(r["aggregate_id"], "history", f"v{r['version']} "
                                   + ("present" if r["state"] == "missing" else "absent"),
                                   r["state"]) for r in gaps]
        return differences + _verify_versions(newest, others)


    async def forget(self, by_tenant: ByTenant, newest: Newest) -> None:
        """Delete the aggregates' rows, so a replay rewrites them from scratch (a row
        with a wrong, higher version would otherwise shadow it)."""
        def delete() -> None:
            with self._connect() as conn, conn.transaction():
                for tenant, ids in by_tenant.items():
                    conn.execute("SELECT set_config('ringiflow.tenant_id', %s, true)",
                                 (str(tenant),))
                    for table, column in AGGREGATE_COLUMNS:
                        conn.execute(sql.SQL("DELETE FROM {} WHERE {} = ANY(%s)").format(
                            sql.Identifier("read_model", table), sql.Identifier(column)), (ids,))

        await asyncio.to_thread(delete)


def _verify_versions(newest: list[dict[str, Any]],
                     actual: dict[tuple[str, UUID, UUID], int]) -> list[Difference]:
    """Users and definitions: the row's version is the newest event's (ids are unique
    per tenant only)."""
    differences = []
    for row in newest:
        kind = "users" if row["aggregate_type"] == "user" else "definitions"
        have = actual.pop((kind, row["tenant_id"], row["aggregate_id"]), None)
        if have != row["version"]:
            differences.append(Difference(row["aggregate_id"], f"{kind}.version",
                                          row["version"], have))
    return differences + [Difference(aid, f"{kind}.version", "absent", version)
                          for (kind, _tenant, aid), version in actual.items()]

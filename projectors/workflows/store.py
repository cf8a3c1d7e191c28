"""workflow-projector's writes: the PostgreSQL read models (workflows, their steps,
history and open tasks, users, definitions).

Per batch and tenant, a handful of set-based statements: workflow rows are
upserted from each aggregate's newest snapshot only where it is newer than the
row (`last_event_version`); steps and my_tasks are rebuilt for the rows that
changed; history gets one row per event (unique on event_id); user names are
kept current in every denormalised column. All in one transaction on the
projector role, tenant set per statement group for row-level security."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import psycopg
from psycopg import AsyncConnection, errors
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from contract import definition_of, user_of, workflow_of
from infra.clients import set_tenant
from projectors.projection import (
    Delivery,
    NonRetryable,
    Retryable,
    Unavailable,
    newest_by_aggregate,
    notify_applied,
)

UPSERT_WORKFLOWS = """
INSERT INTO read_model.workflow_read_models AS w (
    id, tenant_id, definition_id, definition_name, title, description, status, priority,
    current_step_id, current_step_name, current_assignee_id, current_assignee_name,
    initiated_by_id, initiated_by_name, due_date, completed_at, created_at, updated_at,
    search_text, last_event_id, last_event_version)
SELECT s.id, %(tenant)s, s.definition_id, s.definition_name, s.title, s.description,
       s.status, s.priority, s.current_step_id, s.current_step_name, s.current_assignee_id,
       coalesce(ua.display_name, s.current_assignee_name), s.initiator_id,
       coalesce(ui.display_name, s.initiator_name), s.due_date,
       coalesce(s.completed_at, s.cancelled_at), s.created_at, s.updated_at,
       to_tsvector('simple', s.title || ' ' || coalesce(s.description, '')),
       x.event_id, s.version
FROM jsonb_to_recordset(%(rows)s) AS x(event_id uuid, snapshot jsonb)
CROSS JOIN LATERAL jsonb_to_record(x.snapshot) AS s(
    id uuid, version integer, status text, definition_id uuid, definition_name text,
    title text, description text, priority text, due_date timestamptz, initiator_id uuid,
    initiator_name text, current_step_id uuid, current_step_name text,
    current_assignee_id uuid, current_assignee_name text, created_at timestamptz,
    updated_at timestamptz, completed_at timestamptz, cancelled_at timestamptz)
LEFT JOIN read_model.users ui ON ui.id = s.initiator_id
LEFT JOIN read_model.users ua ON ua.id = s.current_assignee_id
ON CONFLICT (tenant_id, id) DO UPDATE SET
    definition_name = EXCLUDED.definition_name, title = EXCLUDED.title,
    description = EXCLUDED.description, status = EXCLUDED.status,
    priority = EXCLUDED.priority, current_step_id = EXCLUDED.current_step_id,
    current_step_name = EXCLUDED.current_step_name,
    current_assignee_id = EXCLUDED.current_assignee_id,
    current_assignee_name = EXCLUDED.current_assignee_name,
    initiated_by_name = EXCLUDED.initiated_by_name, due_date = EXCLUDED.due_date,
    completed_at = EXCLUDED.completed_at, updated_at = EXCLUDED.updated_at,
    search_text = EXCLUDED.search_text, last_event_id = EXCLUDED.last_event_id,
    last_event_version = EXCLUDED.last_event_version
WHERE w.last_event_version < EXCLUDED.last_event_version
RETURNING w.id
"""

REPLACE_STEPS = """
INSERT INTO read_model.workflow_steps (workflow_id, step_id, tenant_id, step_order, name,
    assignee_id, assignee_name, status, decided_by_id, decided_at, comment, due_date)
SELECT w.id, st.step_id, %(tenant)s, st."order", st.name, st.assignee_id,
       coalesce(u.display_name, st.assignee_name), st.status,
       CASE WHEN st.decided_at IS NOT NULL THEN st.assignee_id END, st.decided_at,
       st.comment, w.due_date
FROM read_model.workflow_read_models w
JOIN jsonb_to_recordset(%(rows)s) AS x(id uuid, snapshot jsonb) ON x.id = w.id
CROSS JOIN LATERAL jsonb_to_recordset(x.snapshot->'steps') AS st(
    step_id uuid, "order" integer, name text, assignee_id uuid, assignee_name text,
    status text, decided_at timestamptz, comment text)
LEFT JOIN read_model.users u ON u.id = st.assignee_id
WHERE w.id = ANY(%(ids)s)
"""

REPLACE_TASKS = """
INSERT INTO read_model.my_tasks (workflow_id, step_id, tenant_id, assignee_id, assignee_name,
    workflow_title, step_name, priority, due_date, assigned_at)
SELECT w.id, st.step_id, %(tenant)s, st.assignee_id, coalesce(u.display_name, st.assignee_name),
       w.title, st.name, w.priority, w.due_date, coalesce(st.assigned_at, w.updated_at)
FROM read_model.workflow_read_models w
JOIN jsonb_to_recordset(%(rows)s) AS x(id uuid, snapshot jsonb) ON x.id = w.id
CROSS JOIN LATERAL jsonb_to_recordset(x.snapshot->'steps') AS st(
    step_id uuid, name text, assignee_id uuid, assignee_name text, status text,
    assigned_at timestamptz)
LEFT JOIN read_model.users u ON u.id = st.assignee_id
WHERE w.id = ANY(%(ids)s) AND w.status = 'in_progress' AND st.status = 'pending'
"""

INSERT_HISTORY = """
INSERT INTO read_model.workflow_history (event_id, tenant_id, workflow_id, version, event_type,
    actor_id, actor_name, occurred_at, correlation_id, payload)
SELECT h.event_id, %(tenant)s, h.workflow_id, h.version, h.event_type, h.actor_id,
       h.actor_name, h.occurred_at, h.correlation_id, h.payload
FROM jsonb_to_recordset(%(rows)s) AS h(event_id uuid, workflow_id uuid, version integer,
    event_type text, actor_id uuid, actor_name text, occurred_at timestamptz,
    correlation_id uuid, payload jsonb)
ON CONFLICT (event_id) DO NOTHING
"""

UPSERT_USERS = """
INSERT INTO read_model.users AS u (id, tenant_id, display_name, email, version)
SELECT s.id, %(tenant)s, s.display_name, s.email, s.version
FROM jsonb_to_recordset(%(rows)s) AS s(id uuid, display_name text, email text, version integer)
ON CONFLICT (tenant_id, id) DO UPDATE SET display_name = EXCLUDED.display_name,
    email = EXCLUDED.email, version = EXCLUDED.version
WHERE u.version < EXCLUDED.version
RETURNING u.id, u.display_name
"""

# A renamed user's name, wherever it was copied. Workflow rows written later
# read it from read_model.users, so both arrival orders converge. (One UPDATE
# per table: two updates of one row in a single statement would lose one.)
CASCADE_NAMES = (
    """UPDATE read_model.workflow_read_models w SET
         initiated_by_name = coalesce(
             (SELECT r.name FROM unnest(%(ids)s::uuid[], %(names)s::text[]) AS r(id, name)
              WHERE r.id = w.initiated_by_id), w.initiated_by_name),
         current_assignee_name = coalesce(
             (SELECT r.name FROM unnest(%(ids)s::uuid[], %(names)s::text[]) AS r(id, name)
              WHERE r.id = w.current_assignee_id), w.current_assignee_name)
       WHERE w.initiated_by_id = ANY(%(ids)s) OR w.current_assignee_id = ANY(%(ids)s)""",
    """UPDATE read_model.workflow_steps s SET assignee_name = r.name
       FROM unnest(%(ids)s::uuid[], %(names)s::text[]) AS r(id, name)
       WHERE s.assignee_id = r.id AND s.assignee_name IS DISTINCT FROM r.name""",
    """UPDATE read_model.my_tasks t SET assignee_name = r.name
       FROM unnest(%(ids)s::uuid[], %(names)s::text[]) AS r(id, name)
       WHERE t.assignee_id = r.id AND t.assignee_name IS DISTINCT FROM r.name""",
)

UPSERT_DEFINITIONS = """
INSERT INTO read_model.definitions AS d (id, tenant_id, name, steps, version)
SELECT s.id, %(tenant)s, s.name, s.steps, s.version
FROM jsonb_to_recordset(%(rows)s) AS s(id uuid, name text, steps jsonb, version integer)
ON CONFLICT (tenant_id, id) DO UPDATE SET name = EXCLUDED.name, steps = EXCLUDED.steps,
    version = EXCLUDED.version
WHERE d.version < EXCLUDED.version
"""

RETRYABLE_SQLSTATES = {"40001", "40P01", "55P03", "57014"}  # serialization, deadlock, lock, cancel


class WorkflowStore:
    """Writes `read_model` (the views over the live version) unless given the
    schema of a version being rebuilt (ADR 0005)."""

    def __init__(self, database_url: str, pool_size: int = 4,
                 schema: str = "read_model") -> None:
        self.pool = AsyncConnectionPool(database_url, min_size=1, max_size=pool_size,
                                        open=False, kwargs={"prepare_threshold": 1})
        self.schema = schema

    def _sql(self, statement: str) -> str:
        return statement if self.schema == "read_model" else \
            statement.replace("read_model.", f"{self.schema}.")

    async def start(self) -> None:
        await self.pool.open(wait=True, timeout=30)

    async def close(self) -> None:
        await self.pool.close()

    async def apply(self, batch: Sequence[Delivery]) -> None:
        by_tenant: dict[UUID, list[Delivery]] = defaultdict(list)
        for delivery in batch:
            by_tenant[delivery.envelope.tenant_id].append(delivery)
        try:
            # Pipelined: the statements go out without waiting for each other's
            # answers, and the batch costs two round trips (one for the rows the
            # upsert changed, one for the rest and the COMMIT) per tenant, not ten.
            async with self.pool.connection() as conn, conn.pipeline(), conn.transaction():
                for tenant, deliveries in by_tenant.items():
                    await set_tenant(conn, tenant)
                    await self._apply_tenant(conn, tenant, deliveries)
                if self.schema == "read_model":  # delivered on commit, to waiting queries
                    await notify_applied(conn, "postgres", (
                        (d.envelope.tenant_id, d.envelope.aggregate_id, d.envelope.version)
                        for d in batch))
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
            raise Unavailable(f"PostgreSQL unreachable: {exc}") from exc
        except psycopg.Error as exc:
            state = exc.sqlstate or ""
            if state in RETRYABLE_SQLSTATES:
                raise Retryable(f"{type(exc).__name__}: {exc}") from exc
            if isinstance(exc, errors.DataError | errors.IntegrityError):
                raise NonRetryable(f"{type(exc).__name__}: {exc}") from exc
            raise Retryable(f"{type(exc).__name__}: {exc}") from exc

    async def _apply_tenant(self, conn: AsyncConnection, tenant: UUID,
                            deliveries: list[Delivery]) -> None:
        kinds: dict[str, list[Delivery]] = defaultdict(list)
        for delivery in deliveries:
            kinds[delivery.envelope.aggregate_type.value].append(delivery)
        if users := kinds.get("user"):
            await self._users(conn, tenant, users)
        if definitions := kinds.get("definition"):
            rows = [definition_of(d.envelope) for d in newest_by_aggregate(definitions)]
            await conn.execute(self._sql(UPSERT_DEFINITIONS),
                               {"tenant": tenant, "rows": Jsonb(rows)})
        if workflows := kinds.get("workflow"):
            await self._workflows(conn, tenant, workflows)

    async def _users(self, conn: AsyncConnection, tenant: UUID,
                     deliveries: list[Delivery]) -> None:
        rows = [user_of(d.envelope) for d in newest_by_aggregate(deliveries)]
        cur = await conn.execute(self._sql(UPSERT_USERS),
                                 {"tenant": tenant, "rows": Jsonb(rows)})
        changed = await cur.fetchall()
        if changed:
            params = {"ids": [r[0] for r in changed], "names": [r[1] for r in changed]}
            for statement in CASCADE_NAMES:
                await conn.execute(self._sql(statement), params)

    async def _workflows(self, conn: AsyncConnection, tenant: UUID,
                         deliveries: list[Delivery]) -> None:
        history = [history_row(d) for d in deliveries]
        await conn.execute(self._sql(INSERT_HISTORY), {"tenant": tenant, "rows": Jsonb(history)})
        newest = newest_by_aggregate(deliveries)
        rows = [{"event_id": str(d.envelope.event_id), "snapshot": workflow_of(d.envelope)}
                for d in newest]
        cur = await conn.execute(self._sql(UPSERT_WORKFLOWS),
                                 {"tenant": tenant, "rows": Jsonb(rows)})
        changed = [r[0] for r in await cur.fetchall()]
        if not changed:
            return  # every event was older than what the rows already show
        snapshots = [{"id": workflow_of(d.envelope)["id"], "snapshot": workflow_of(d.envelope)}
                     for d in newest]
        params = {"tenant": tenant, "ids": changed, "rows": Jsonb(snapshots)}
        for table, insert in (("workflow_steps", REPLACE_STEPS), ("my_tasks", REPLACE_TASKS)):
            await conn.execute(f"DELETE FROM {self.schema}.{table} WHERE workflow_id = ANY(%s)",
                               (changed,))
            await conn.execute(self._sql(insert), params)


def history_row(delivery: Delivery) -> dict[str, Any]:
    e = delivery.envelope
    return {
        "event_id": str(e.event_id), "workflow_id": str(e.aggregate_id), "version": e.version,
        "event_type": e.event_type, "actor_id": str(e.metadata.user_id or "") or None,
        "actor_name": e.payload.get("actor_name"), "occurred_at": e.occurred_at.isoformat(),
        "correlation_id": str(e.metadata.correlation_id), "payload": e.payload,
    }

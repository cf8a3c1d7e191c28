"""The reads behind the query API, one function per read model, tenant-scoped
(row-level security on PostgreSQL, tenant in every Redis key and OpenSearch
filter)."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import orjson
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from contract import ConsistencyToken
from infra.clients import set_tenant
from infra.problems import AppError
from saga import store as saga_store

SORTS = {
    "created": sql.SQL("created_at"),
    "updated": sql.SQL("updated_at"),
    "due": sql.SQL("coalesce(due_date, '9999-12-31T00:00:00Z'::timestamptz)"),
    "priority": sql.SQL("(CASE priority WHEN 'urgent' THEN 4 WHEN 'high' THEN 3 "
                        "WHEN 'medium' THEN 2 ELSE 1 END)"),
}
LIST_COLUMNS = sql.SQL(
    "id, definition_id, definition_name, title, status, priority, current_step_id, "
    "current_step_name, current_assignee_id, current_assignee_name, initiated_by_id, "
    "initiated_by_name, due_date, completed_at, created_at, updated_at, last_event_version")



def _retrieved(read: asyncio.Future[Any]) -> None:
    """A read nobody awaits any more may fail: that is not an unhandled error."""
    if not read.cancelled():
        read.exception()


class InvalidCursor(AppError):
    code = "invalid_cursor"

class Reads:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool  # from `Reads.pool_for`: each read sends its own BEGIN and COMMIT
        # Reads queue here, not in the pool: the pool hands a returned connection to
        # one of its waiters over several turns of the event loop, which under load
        # (hundreds of waiters, a busy loop) left connections idle between reads.
        self.gate = asyncio.Semaphore(pool.max_size)

    @staticmethod
    def pool_for(url: str, max_size: int = 20) -> AsyncConnectionPool:
        # timeout: a read queued for a connection gives up by itself (never cancelled).
        return AsyncConnectionPool(url, min_size=2, max_size=max_size, open=False, timeout=10,
                                   kwargs={"prepare_threshold": 1, "autocommit": True})

    async def _fetch(self, tenant: UUID, query: sql.Composable | str,
                     params: dict[str, Any] | tuple[Any, ...]) -> list[dict[str, Any]]:
        # Shielded: a caller that stops waiting (a consistency wait at its deadline)
        # does not cancel the read mid-flight, so the connection always goes back to
        # the pool idle, by the read itself (bounded by the pool's timeout). Under
        # load, with reads cancelled mid-pipeline, the pool once counted 20
        # connections of which 17 were neither idle in it nor open in PostgreSQL.
        read = asyncio.ensure_future(self._read(tenant, query, params))
        read.add_done_callback(_retrieved)
        return await asyncio.shield(read)

    async def _read(self, tenant: UUID, query: sql.Composable | str,
                    params: dict[str, Any] | tuple[Any, ...]) -> list[dict[str, Any]]:
        # One round trip: BEGIN, the tenant, the query and COMMIT go out pipelined on
        # an autocommit connection. Under load each round trip waits its turn on the
        # event loop while it holds a pooled connection (ADR 0008).
        async with self.gate, self.pool.connection() as conn:
            try:
                async with conn.pipeline():
                    await conn.execute("BEGIN READ ONLY")
                    await set_tenant(conn, tenant)
                    cur = conn.cursor(row_factory=dict_row)
                    await cur.execute(query, params)
                    await conn.execute("COMMIT")
            except BaseException:
                if not conn.closed:  # the COMMIT was skipped: the pool gets it idle
                    await conn.rollback()
                raise
            return await cur.fetchall()

    # --- workflow list (keyset pagination) --------------------------------------------

    async def workflows(self, tenant: UUID, *, sort: str, direction: str, limit: int,
                        cursor: str | None, filters: dict[str, Any]) -> dict[str, Any]:
        key = SORTS[sort]
        where = [sql.SQL("true")]
        params: dict[str, Any] = {"limit": limit + 1}
        for name, column in (("status", "status"), ("priority", "priority")):
            if filters.get(name):
                where.append(sql.SQL("{} = ANY(%({})s)").format(sql.Identifier(column),
                                                                 sql.SQL(name)))
                params[name] = filters[name]
        for name, column in (("initiator", "initiated_by_id"),
                             ("assignee", "current_assignee_id")):
            if filters.get(name):
                where.append(sql.SQL("{} = %({})s").format(sql.Identifier(column),
                                                            sql.SQL(name)))
                params[name] = filters[name]
        if filters.get("due_before"):
            where.append(sql.SQL("due_date < %(due_before)s"))
            params["due_before"] = filters["due_before"]
        if filters.get("due_after"):
            where.append(sql.SQL("due_date > %(due_after)s"))
            params["due_after"] = filters["due_after"]
        if cursor:
            value, last_id = decode_cursor(cursor, sort, direction)
            op = sql.SQL(">") if direction == "asc" else sql.SQL("<")
            where.append(sql.SQL("({key}, id) {op} (%(after_value)s, %(after_id)s)").format(
                key=key, op=op))
            params |= {"after_value": value, "after_id": last_id}
        order = sql.SQL("ASC") if direction == "asc" else sql.SQL("DESC")
        query = sql.SQL(
            "SELECT {cols}, {key} AS sort_value FROM read_model.workflow_read_models "
            "WHERE {where} ORDER BY {key} {order}, id {order} LIMIT %(limit)s").format(
            cols=LIST_COLUMNS, key=key, where=sql.SQL(" AND ").join(where), order=order)
        rows = await self._fetch(tenant, query, params)
        page, more = rows[:limit], len(rows) > limit
        next_cursor = encode_cursor(sort, direction, page[-1]["sort_value"], page[-1]["id"]) \
            if more else None
        for row in page:
            row.pop("sort_value")
        return {"items": page, "next_cursor": next_cursor}

    async def applied_workflow_version(self, tenant: UUID, token: ConsistencyToken) -> int:
        table = {"workflow": "workflow_read_models", "user": "users",
                 "definition": "definitions"}[token.aggregate_type.value]
        column = "last_event_version" if table == "workflow_read_models" else "version"
        rows = await self._fetch(tenant, sql.SQL("SELECT {} AS v FROM read_model.{} WHERE id = %s")
                                 .format(sql.Identifier(column), sql.Identifier(table)),
                                 (token.aggregate_id,))
        return int(rows[0]["v"]) if rows else 0

    # --- event store reads ---------------------------------------------------------

    async def trace_of(self, tenant: UUID, token: ConsistencyToken) -> str | None:
        """The trace id of the command that wrote the token's version."""
        rows = await self._fetch(tenant, "SELECT metadata->>'trace_id' AS t FROM "
                                 "event_store.events WHERE tenant_id = %s AND aggregate_id = %s "
                                 "AND version = %s", (tenant, token.aggregate_id, token.version))
        return rows[0]["t"] if rows else None

    async def snapshot(self, tenant: UUID, workflow_id: UUID,
                       as_of: datetime | None = None) -> dict[str, Any] | None:
        query = ("SELECT aggregate FROM event_store.events WHERE aggregate_id = %s "
                 "AND aggregate_type = 'workflow'")
        params: tuple[Any, ...] = (workflow_id,)
        if as_of is not None:
            query += " AND occurred_at <= %s"
            params += (as_of,)
        rows = await self._fetch(tenant, query + " ORDER BY version DESC LIMIT 1", params)
        return rows[0]["aggregate"] if rows else None

    async def current_names(self, tenant: UUID, ids: set[str]) -> dict[str, str]:
        if not ids:
            return {}
        rows = await self._fetch(tenant, "SELECT id::text AS id, display_name FROM "
                                 "read_model.users WHERE id = ANY(%s::uuid[])", (list(ids),))
        return {r["id"]: r["display_name"] for r in rows}

    async def history(self, tenant: UUID, workflow_id: UUID) -> list[dict[str, Any]]:
        rows = await self._fetch(
            tenant,
            "SELECT event_id, version, event_type, occurred_at, recorded_at, metadata, payload "
            "FROM event_store.events WHERE aggregate_id = %s AND aggregate_type = 'workflow' "
            "ORDER BY version", (workflow_id,))
        return [{
            "event_id": r["event_id"], "version": r["version"], "event_type": r["event_type"],
            "occurred_at": r["occurred_at"], "recorded_at": r["recorded_at"],
            "actor_id": r["metadata"].get("user_id"), "actor_name": r["payload"].get("actor_name"),
            "correlation_id": r["metadata"].get("correlation_id"),
            "causation_id": r["metadata"].get("causation_id"),
            "trace_id": r["metadata"].get("trace_id"),
            "details": {k: v for k, v in r["payload"].items()
                        if k not in ("actor_id", "actor_name", "workflow_id", "initiator_id")},
        } for r in rows]

    # --- completion and notifications ----------------------------------------------

    async def completion(self, tenant: UUID, workflow_id: UUID) -> dict[str, Any] | None:
        rows = await self._fetch(tenant, f"SELECT {saga_store.COLUMNS} FROM saga.completions "
                                 "WHERE tenant_id = %s AND workflow_id = %s",
                                 (tenant, workflow_id))
        return saga_store.of_row(rows[0]).view() if rows else None

    async def notifications(self, tenant: UUID, workflow_id: UUID | None,
                            limit: int) -> list[dict[str, Any]]:
        where = "tenant_id = %s" + (" AND workflow_id = %s" if workflow_id else "")
        params = (tenant, workflow_id) if workflow_id else (tenant,)
        rows = await self._fetch(
            tenant, "SELECT notification_id, channel, recipient_id, workflow_id, kind, address, "
            "subject, status, attempts, last_error, first_attempt_at, sent_at FROM "
            f"notifications.deliveries WHERE {where} ORDER BY first_attempt_at DESC LIMIT %s",
            (*params, limit))
        for row in rows:  # a chat webhook's URL is its credential: show where, not which
            if row["channel"] == "chat" and row["address"]:
                row["address"] = "/".join(row["address"].split("/")[:3]) + "/…"
        return rows

    # --- tasks and stats -------------------------------------------------------------

    async def my_tasks(self, tenant: UUID, user_id: UUID, limit: int) -> list[dict[str, Any]]:
        return await self._fetch(
            tenant,
            "SELECT workflow_id, step_id, workflow_title, step_name, priority, due_date, "
            "assigned_at FROM read_model.my_tasks WHERE assignee_id = %s "
            "ORDER BY coalesce(due_date, 'infinity'::timestamptz), assigned_at, step_id "
            "LIMIT %s", (user_id, limit))

    async def stats(self, tenant: UUID, now: datetime) -> dict[str, int]:
        rows = await self._fetch(
            tenant,
            "SELECT count(*) FILTER (WHERE status = 'in_progress') AS pending, "
            "count(*) FILTER (WHERE status IN ('approved', 'rejected') "
            "  AND completed_at >= %(day)s AND completed_at < %(day)s + interval '1 day') "
            "  AS completed_today, "
            "count(*) FILTER (WHERE status = 'in_progress' AND due_date < %(now)s) AS overdue "
            "FROM read_model.workflow_read_models",
            {"day": now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0),
             "now": now})
        return {k: int(v) for k, v in rows[0].items()}




def encode_cursor(sort: str, direction: str, value: Any, last_id: UUID) -> str:
    raw = orjson.dumps([sort, direction, value.isoformat() if isinstance(value, datetime)
                        else value, str(last_id)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, sort: str, direction: str) -> tuple[Any, UUID]:
    try:
        sort_of, direction_of, value, last_id = orjson.loads(
            base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if (sort_of, direction_of) != (sort, direction):
            raise ValueError("sort changed")
        if not isinstance(last_id, str):
            raise ValueError("bad id")
        if sort == "priority":
            # the sort key is CASE ... 1..4: anything else cannot have come from a page
            if type(value) is not int or not 1 <= value <= 4:
                raise ValueError("bad priority rank")
        else:
            if not isinstance(value, str):
                raise ValueError("bad timestamp")
            value = datetime.fromisoformat(value)
            if value.tzinfo is None:
                raise ValueError("timestamp without time zone")
        return value, UUID(last_id)
    except (ValueError, TypeError, RecursionError, orjson.JSONDecodeError):
        raise InvalidCursor("cursor is not one this list returned for the same sort and "
                            "direction; start again without a cursor") from None

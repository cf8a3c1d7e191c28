"""The saga's durable state: one row of `saga.completions` per approved workflow
(ADR 0011). Every step's outcome is written as soon as it is known, so a worker killed
at any point resumes at the first step without a recorded outcome."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from infra.clients import set_tenant

FORWARD = ("finalize", "notify", "sync")
# The compensation of each forward step, run in reverse order of the steps done.
COMPENSATION = {"sync": "withdraw", "notify": "correct", "finalize": "unfinalize"}
COLUMNS = ("tenant_id, workflow_id, status, run, step, steps, attempts, last_error, "
           "started_at, updated_at, finished_at")


@dataclass
class Completion:
    tenant_id: UUID
    workflow_id: UUID
    status: str = "running"  # running | compensating | completed | completion_failed
    run: int = 1
    step: str | None = FORWARD[0]
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)  # step -> outcome
    attempts: int = 0  # of the current step
    last_error: str | None = None
    started_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None

    def view(self) -> dict[str, Any]:
        """What the query API and the CLI show."""
        return {"workflow_id": str(self.workflow_id), "status": self.status, "run": self.run,
                "current_step": self.step, "attempts": self.attempts,
                "last_error": self.last_error,
                "steps": [{"step": name, **self.steps[name]} for name in
                          (*FORWARD, *COMPENSATION.values(), "record") if name in self.steps],
                "started_at": iso(self.started_at), "updated_at": iso(self.updated_at),
                "finished_at": iso(self.finished_at)}


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def of_row(row: dict[str, Any]) -> Completion:
    return Completion(**row)




class Completions:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def start(self, started: Sequence[tuple[UUID, UUID]]) -> int:
        """A saga per (tenant, workflow) not started before; how many were new."""
        new = 0
        async with self.pool.connection() as conn:
            for tenant, workflow in started:
                async with conn.transaction():
                    await set_tenant(conn, tenant)
                    cur = await conn.execute(
                        "INSERT INTO saga.completions (tenant_id, workflow_id, status, step) "
                        "VALUES (%s, %s, 'running', %s) ON CONFLICT DO NOTHING",
                        (tenant, workflow, FORWARD[0]))
                    new += cur.rowcount
        return new

    async def unfinished(self, attempts_below: int, limit: int = 50) -> list[Completion]:
        """Sagas to run (every tenant's), oldest first; those out of attempts wait for
        an operator's `ringiflow saga retry`."""
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                f"SELECT {COLUMNS} FROM saga.completions WHERE finished_at IS NULL "
                "AND attempts < %s ORDER BY updated_at LIMIT %s", (attempts_below, limit))
            return [of_row(r) for r in await cur.fetchall()]

    async def save(self, saga: Completion) -> None:
        async with self.pool.connection() as conn, conn.transaction():
            await set_tenant(conn, saga.tenant_id)
            cur = await conn.execute(
                "UPDATE saga.completions SET status = %s, step = %s, steps = %s, "
                "attempts = %s, last_error = %s, updated_at = clock_timestamp(), "
                "finished_at = CASE WHEN %s IN ('completed', 'completion_failed') "
                "THEN clock_timestamp() END WHERE tenant_id = %s AND workflow_id = %s "
                "AND run = %s RETURNING updated_at, finished_at",
                (saga.status, saga.step, Jsonb(saga.steps), saga.attempts, saga.last_error,
                 saga.status, saga.tenant_id, saga.workflow_id, saga.run))
            row = await cur.fetchone()
        if row:
            saga.updated_at, saga.finished_at = row

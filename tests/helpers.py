"""Test helpers: people with tokens, and a scenario builder on the command API."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from uuid import UUID, uuid4

import httpx
import psycopg
from psycopg.rows import dict_row

from infra.auth import mint_token
from infra.settings import libpq_url

T = TypeVar("T")

COMMANDS = "/api/v1/commands"


@dataclass
class Person:
    tenant_id: UUID
    name: str
    roles: list[str] = field(default_factory=lambda: ["user"])
    user_id: UUID = field(default_factory=uuid4)

    def token(self, secret: str) -> str:
        return mint_token(secret, tenant_id=self.tenant_id, user_id=self.user_id,
                          name=self.name, roles=self.roles)


@dataclass
class Tenant:
    """One tenant with an admin, an initiator and two approvers, registered."""

    client: httpx.AsyncClient
    secret: str
    database_url: str  # owner role: tests inspect what was written
    tenant_id: UUID = field(default_factory=uuid4)

    def __post_init__(self) -> None:
        self.admin = Person(self.tenant_id, "管理者", ["admin"])
        self.initiator = Person(self.tenant_id, "申請 太郎")
        self.approver1 = Person(self.tenant_id, "承認 一郎")
        self.approver2 = Person(self.tenant_id, "承認 二郎")
        self.definition_id: UUID | None = None

    def headers(self, person: Person, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {person.token(self.secret)}", **extra}

    async def post(self, person: Person, path: str, body: dict[str, Any] | None = None,
                   **headers: str) -> httpx.Response:
        return await self.client.post(COMMANDS + path, json=body or {},
                                      headers=self.headers(person, **headers))

    async def ok(self, person: Person, path: str, body: dict[str, Any] | None = None,
                 **headers: str) -> dict[str, Any]:
        response = await self.post(person, path, body, **headers)
        assert response.status_code in (200, 201), response.text
        return response.json()

    async def setup(self) -> Tenant:
        for person in (self.initiator, self.approver1, self.approver2):
            await self.ok(self.admin, "/users", {"user_id": str(person.user_id),
                                                 "display_name": person.name,
                                                 "email": f"{person.user_id.hex[:8]}@example.jp"})
        created = await self.ok(self.admin, "/definitions", {
            "name": "経費精算", "steps": [
                {"name": "課長承認", "assignee_id": str(self.approver1.user_id)},
                {"name": "部長承認", "assignee_id": str(self.approver2.user_id)},
            ]})
        self.definition_id = UUID(created["aggregate_id"])
        return self

    async def create_workflow(self, title: str = "ノートPC購入") -> dict[str, Any]:
        return await self.ok(self.initiator, "/workflows", {
            "definition_id": str(self.definition_id), "title": title, "priority": "high"})

    async def submitted_workflow(self) -> tuple[UUID, list[UUID]]:
        """A submitted workflow's id and its step ids (first step pending)."""
        created = await self.create_workflow()
        workflow_id = UUID(created["aggregate_id"])
        await self.ok(self.initiator, f"/workflows/{workflow_id}/submit")
        return workflow_id, await self.step_ids(workflow_id)

    async def step_ids(self, workflow_id: UUID) -> list[UUID]:
        created = (await self.events(workflow_id))[0]
        return [UUID(step["step_id"]) for step in created["payload"]["steps"]]

    async def events(self, aggregate_id: UUID | None = None) -> list[dict[str, Any]]:
        """This tenant's stored events (of one aggregate), oldest first."""
        query = ("SELECT event_id, aggregate_id, version, event_type, payload, aggregate, "
                 "metadata, position FROM event_store.events WHERE tenant_id = %s")
        params: list[Any] = [self.tenant_id]
        if aggregate_id is not None:
            query += " AND aggregate_id = %s"
            params.append(aggregate_id)
        async with await psycopg.AsyncConnection.connect(
            libpq_url(self.database_url), row_factory=dict_row
        ) as conn:
            cur = await conn.execute(query + " ORDER BY position", params)
            return await cur.fetchall()

    async def counts(self) -> tuple[int, int, int]:
        """(events, outbox rows, idempotency keys) of this tenant."""
        async with await psycopg.AsyncConnection.connect(libpq_url(self.database_url)) as conn:
            cur = await conn.execute(
                "SELECT (SELECT count(*) FROM event_store.events WHERE tenant_id = %(t)s), "
                "(SELECT count(*) FROM event_store.outbox WHERE tenant_id = %(t)s), "
                "(SELECT count(*) FROM event_store.idempotency_keys WHERE tenant_id = %(t)s)",
                {"t": self.tenant_id})
            row = await cur.fetchone()
            assert row is not None
            return tuple(row)


def up_fails_fast(env: dict[str, str], *needles: str, limit_s: float = 30) -> str:
    """`ringiflow up` exits 2 within `limit_s`, its stderr naming every needle."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "ringiflow", "up"], env=env,
                            capture_output=True, text=True, timeout=180)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stdout + result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
    assert elapsed < limit_s, f"took {elapsed:.1f} s to fail"
    return result.stderr


def listening_pid(url: str) -> int:
    """The process listening on the port of a URL (or host:port)."""
    import psutil

    port = int(url.rsplit(":", 1)[1].split("/")[0])
    return next(c.pid for c in psutil.net_connections("tcp")
                if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid)


async def eventually(probe: Callable[[], Awaitable[T]], within_s: float = 60.0, *,
                     every_s: float = 0.2, what: str = "not seen in time") -> T:
    """Poll `probe` until it answers something truthy, and return that; fail naming
    `what` once `within_s` has passed."""
    deadline = time.monotonic() + within_s
    while not (result := await probe()):
        assert time.monotonic() < deadline, f"not seen within {within_s:.0f} s: {what}"
        await asyncio.sleep(every_s)
    return result

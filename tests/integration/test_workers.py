"""End to end: commands over HTTP -> outbox -> relay -> Kafka -> every Faust
worker -> PostgreSQL, Redis, OpenSearch and the derived topics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import orjson
import psycopg
import pytest

import contract
from infra.clients import opensearch_client, redis_client
from infra.settings import Settings, libpq_url
from projectors.cache.layout import dashboard
from projectors.search.store import ALIAS
from tests.conftest import TEST_JWT_SECRET
from tests.helpers import Tenant, eventually
from tests.integration.test_streams import read_raw

pytestmark = pytest.mark.slow


@pytest.fixture
async def tenant(system: dict[str, str], isolated: Settings) -> AsyncIterator[Tenant]:
    settings = isolated
    async with httpx.AsyncClient(base_url=system["commands"], timeout=30) as client:
        yield await Tenant(client, TEST_JWT_SECRET, settings.database_url or "").setup()


async def test_a_workflow_reaches_every_read_model(tenant: Tenant, isolated: Settings,
                                                   system: dict[str, str]) -> None:
    settings = isolated
    workflow_id, (step1, step2) = await tenant.submitted_workflow()
    await tenant.ok(tenant.approver1, f"/workflows/{workflow_id}/steps/{step1}/approve")
    final = await tenant.ok(tenant.approver2, f"/workflows/{workflow_id}/steps/{step2}/approve")
    # The completion saga appends its own events after the approval (finalized,
    # completed), so each read model reaches this version or a later one.
    version = final["version"]

    async def postgres() -> tuple | None:
        async with await psycopg.AsyncConnection.connect(
                libpq_url(settings.database_url or "")) as conn:
            cur = await conn.execute(
                "SELECT status, last_event_version, initiated_by_name FROM "
                "read_model.workflow_read_models WHERE id = %s", (workflow_id,))
            row = await cur.fetchone()
            return row if row and row[1] >= version else None

    status, reached, initiator = await eventually(postgres)
    assert (status, initiator) == ("approved", "申請 太郎") and reached >= version

    redis = redis_client(settings.redis_url or "")
    try:
        async def cached() -> dict | None:
            body = await redis.get(f"workflow:{tenant.tenant_id}:{workflow_id}")
            snapshot = orjson.loads(body) if body else None
            return snapshot if snapshot and snapshot["version"] >= version else None

        assert (await eventually(cached))["status"] == "approved"
        stats = await dashboard(redis, tenant.tenant_id, contract.utcnow())
        assert stats["completed_today"] == 1 and stats["pending"] == 0
    finally:
        await redis.aclose()

    search = opensearch_client(settings.opensearch_url or "")
    try:
        async def indexed() -> dict | None:
            if not await search.indices.exists_alias(name=ALIAS):
                return None
            await search.indices.refresh(index=ALIAS)
            found = await search.search(index=ALIAS, body={"query": {"bool": {
                "filter": [{"term": {"tenant_id": str(tenant.tenant_id)}}],
                "must": [{"match": {"title": "ノートPC"}}]}}, "version": True})
            hits = found["hits"]["hits"]
            return hits[0] if hits and hits[0]["_version"] >= version else None

        assert (await eventually(indexed))["_source"]["status"] == "approved"
    finally:
        await search.close()

    async def derived(topic: str, key: str) -> list:
        records = await read_raw(settings.kafka_bootstrap or "", topic)
        return [orjson.loads(r.value) for r in records if r.key == key.encode()]

    audit = await eventually(lambda: derived(contract.AUDIT_EVENTS.name, str(tenant.tenant_id)))
    assert {a["aggregate_id"] for a in audit} >= {str(workflow_id)}

    async def approval_requests() -> list:
        # The completion saga notifies the approver too, from a group of its own: its
        # WorkflowCompleted may reach the topic first.
        return [r for r in await derived(contract.NOTIFICATION_COMMANDS.name,
                                         str(tenant.approver1.user_id))
                if r["type"] == "ApprovalRequested"]

    asked = await eventually(approval_requests)
    assert [r["workflow_id"] for r in asked] == [str(workflow_id)]

    async with httpx.AsyncClient() as client:
        metrics = (await client.get(system["workers"] + "/metrics")).text
    assert 'ringiflow_events_processed_total{group="workflow-projector"}' in metrics
    assert "ringiflow_consumer_lag" in metrics




async def test_undecodable_bytes_on_a_topic_do_not_stop_the_workers(
    tenant: Tenant, isolated: Settings,
) -> None:
    settings = isolated
    from infra.kafka import producer

    garbage = producer(settings.kafka_bootstrap or "")
    garbage.produce(contract.WORKFLOW_EVENTS.name, b"\xff\xfe garbage", b"poison-key")
    assert garbage.flush(10) == 0
    created = await tenant.create_workflow("毒の後")
    workflow_id = created["aggregate_id"]

    async def projected() -> bool:
        async with await psycopg.AsyncConnection.connect(
                libpq_url(settings.database_url or "")) as conn:
            cur = await conn.execute("SELECT 1 FROM read_model.workflow_read_models "
                                     "WHERE id = %s", (workflow_id,))
            return await cur.fetchone() is not None

    assert await eventually(projected)

    async def dead_lettered() -> list:
        records = await read_raw(settings.kafka_bootstrap or "", "workflow-projector.dlq")
        return [r for r in records if r.key == b"poison-key"]

    poison = (await eventually(dead_lettered))[0]
    assert dict(poison.headers)["dlq.error.class"] == b"UndecodableRecord"


def _worker_processes(workers_url: str) -> list:
    """The Faust worker processes behind the workers endpoint (its children)."""
    import psutil

    from tests.helpers import listening_pid

    return psutil.Process(listening_pid(workers_url)).children()


async def test_losing_every_database_session_is_waited_out_not_a_worker_exit(
    tenant: Tenant, system: dict[str, str], isolated: Settings,
) -> None:
    """pg_terminate_backend of the projector sessions (a failover, a restart)
    used to make every worker exit, the Redis and OpenSearch groups too."""
    settings = isolated
    first = await tenant.create_workflow("切断の前")

    async def row(workflow_id: str):
        async def probe():
            async with await psycopg.AsyncConnection.connect(
                    libpq_url(settings.database_url or "")) as conn:
                cur = await conn.execute("SELECT 1 FROM read_model.workflow_read_models "
                                         "WHERE id = %s", (workflow_id,))
                return await cur.fetchone()
        return await eventually(probe)

    await row(first["aggregate_id"])
    before = {p.pid for p in _worker_processes(system["workers"])}
    assert len(before) >= 5
    for _ in range(3):  # again and again, while batches are in flight
        with psycopg.connect(libpq_url(settings.database_url or ""), autocommit=True) as conn:
            killed = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE usename = 'ringiflow_projector' AND datname = current_database()"
            ).fetchone()
        assert killed and killed[0] >= 1
        await tenant.create_workflow("切断の最中")
        await asyncio.sleep(1)
    after = await tenant.create_workflow("切断の後")
    await row(after["aggregate_id"])
    await asyncio.sleep(3)
    assert {p.pid for p in _worker_processes(system["workers"])} == before

"""The query API over real HTTP and WebSocket, on the full pipeline: commands ->
relay -> Kafka -> workers -> read models -> queries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
import websockets

from infra.settings import Settings
from tests.conftest import TEST_JWT_SECRET, component
from tests.helpers import Person, Tenant

pytestmark = pytest.mark.slow
Q = "/api/v1/queries"


@pytest.fixture
async def tenant(system: dict[str, str], isolated: Settings) -> AsyncIterator[Tenant]:
    async with httpx.AsyncClient(base_url=system["commands"], timeout=30) as client:
        yield await Tenant(client, TEST_JWT_SECRET, isolated.database_url or "").setup()


@pytest.fixture
async def queries(system: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=system["queries"], timeout=30) as client:
        yield client


async def get(client: httpx.AsyncClient, tenant: Tenant, person: Person, path: str,
              **params: Any) -> httpx.Response:
    return await client.get(Q + path, params=params, headers=tenant.headers(person))


async def test_a_query_with_the_token_reads_the_write_in_every_read_model(
    tenant: Tenant, queries: httpx.AsyncClient,
) -> None:
    created = await tenant.create_workflow("稟議: 大阪出張の旅費")
    workflow_id, token = created["aggregate_id"], created["consistency_token"]

    listed = await get(queries, tenant, tenant.initiator, "/workflows", after=token)
    assert listed.headers["X-Consistency"] == "reached"
    assert workflow_id in {w["id"] for w in listed.json()["items"]}

    detail = await queries.get(f"{Q}/workflows/{workflow_id}", headers=tenant.headers(
        tenant.initiator, **{"X-Consistency-Token": token}))
    assert detail.status_code == 200 and detail.headers["X-Consistency"] == "reached"
    assert detail.json()["workflow"]["version"] == 1

    found = await get(queries, tenant, tenant.initiator, "/search", q="大阪", after=token)
    assert found.headers["X-Consistency"] == "reached"
    assert [i["workflow_id"] for i in found.json()["items"]] == [workflow_id]
    assert "<em>" in str(found.json()["items"][0]["highlight"])

    submitted = await tenant.ok(tenant.initiator, f"/workflows/{workflow_id}/submit")
    tasks = await get(queries, tenant, tenant.approver1, "/my-tasks",
                      after=submitted["consistency_token"])
    assert tasks.headers["X-Consistency"] == "reached"
    assert [t["workflow_id"] for t in tasks.json()["items"]] == [workflow_id]
    detail = await get(queries, tenant, tenant.initiator, f"/workflows/{workflow_id}",
                       after=submitted["consistency_token"])
    assert detail.json()["workflow"]["status"] == "in_progress"


async def test_an_unreached_token_says_so(tenant: Tenant, queries: httpx.AsyncClient) -> None:
    created = await tenant.create_workflow()
    from contract import ConsistencyToken

    future = ConsistencyToken.decode(created["consistency_token"])
    ahead = ConsistencyToken(future.aggregate_type, future.aggregate_id, 99).encode()
    listed = await get(queries, tenant, tenant.initiator, "/workflows", after=ahead, wait_ms=300)
    assert listed.status_code == 200 and listed.headers["X-Consistency"] == "timeout"
    bad = await get(queries, tenant, tenant.initiator, "/workflows", after="nonsense")
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_consistency_token"


async def test_keyset_pages_stay_correct_while_rows_are_inserted(
    tenant: Tenant, queries: httpx.AsyncClient,
) -> None:
    made = [await tenant.create_workflow(f"頁 {n}") for n in range(5)]
    last = made[-1]["consistency_token"]
    await get(queries, tenant, tenant.initiator, "/workflows", after=last)
    seen: list[str] = []
    cursor = None
    for page_number in range(10):
        params: dict[str, Any] = {"limit": 2, "sort": "created", "direction": "asc"}
        if cursor:
            params["cursor"] = cursor
        page = (await get(queries, tenant, tenant.initiator, "/workflows", **params)).json()
        seen += [w["id"] for w in page["items"]]
        if page_number == 0:  # inserted while paging: must not shift or repeat rows
            await tenant.create_workflow("割り込み")
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen))
    assert [m["aggregate_id"] for m in made] == [s for s in seen if s in
                                                  {m["aggregate_id"] for m in made}]


@pytest.mark.parametrize(("params", "field"), [
    ({"limit": 1000}, "limit"), ({"sort": "size"}, "sort"), ({"status": "lost"}, "status"),
    ({"initiator": "nobody"}, "initiator"), ({"cursor": "garbage"}, None),
])
async def test_bad_parameters_are_422_problems(
    tenant: Tenant, queries: httpx.AsyncClient, params: dict, field: str | None,
) -> None:
    response = await get(queries, tenant, tenant.initiator, "/workflows", **params)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    if field:
        assert any(e["field"].startswith(field) for e in response.json()["errors"])


async def test_time_travel_history_and_tenant_isolation(
    tenant: Tenant, queries: httpx.AsyncClient, system: dict[str, str], isolated: Settings,
) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    workflow_id, (step1, _) = await tenant.submitted_workflow()
    mid = datetime.now(UTC)
    await asyncio.sleep(0.05)
    done = await tenant.ok(tenant.approver1, f"/workflows/{workflow_id}/steps/{step1}/reject",
                           {"comment": "不可"})
    then = await get(queries, tenant, tenant.initiator, f"/workflows/{workflow_id}",
                     as_of=mid.isoformat())
    assert then.json()["workflow"]["status"] == "in_progress"
    assert (await get(queries, tenant, tenant.initiator, f"/workflows/{workflow_id}",
                      as_of=before.isoformat())).status_code == 404
    now = await get(queries, tenant, tenant.initiator, f"/workflows/{workflow_id}",
                    after=done["consistency_token"])
    assert now.json()["workflow"]["status"] == "rejected"
    history = (await get(queries, tenant, tenant.initiator,
                         f"/workflows/{workflow_id}/history")).json()["events"]
    assert [e["event_type"] for e in history][-2:] == ["WorkflowStepCompleted",
                                                      "WorkflowRejected"]
    assert history[-1]["actor_name"] == "承認 一郎" and history[-1]["correlation_id"]

    other = Tenant(tenant.client, TEST_JWT_SECRET, isolated.database_url or "")
    stranger = Person(other.tenant_id, "他社", ["admin"], user_id=tenant.initiator.user_id)
    for path in (f"/workflows/{workflow_id}", f"/workflows/{workflow_id}/history"):
        response = await get(queries, other, stranger, path)
        assert response.status_code == 404 and "稟議" not in response.text
    listed = await get(queries, other, stranger, "/workflows")
    assert listed.json()["items"] == []
    found = await get(queries, other, stranger, "/search", q="ノートPC")
    assert found.json()["items"] == []


async def test_dashboard_counts_for_the_tenant(tenant: Tenant,
                                               queries: httpx.AsyncClient) -> None:
    submitted = None
    for _ in range(2):
        workflow_id, _steps = await tenant.submitted_workflow()
        submitted = workflow_id
    await get(queries, tenant, tenant.initiator, f"/workflows/{submitted}", wait_ms=3000)
    for _ in range(50):
        stats = (await get(queries, tenant, tenant.initiator, "/dashboard/stats")).json()
        if stats["pending"] == 2:
            break
        await asyncio.sleep(0.1)
    assert stats["pending"] == 2 and stats["source"] == "cache"


async def test_websocket_forwards_live_updates_and_refuses_bad_tokens(
    tenant: Tenant, system: dict[str, str],
) -> None:
    url = system["queries"].replace("http", "ws") + Q + "/ws"
    token = tenant.initiator.token(TEST_JWT_SECRET)
    async with websockets.connect(f"{url}?token={token}") as ws:
        hello = orjson.loads(await ws.recv())
        assert hello["type"] == "Subscribed"
        created = await tenant.create_workflow("ライブ")
        async with asyncio.timeout(30):
            while True:
                message = orjson.loads(await ws.recv())
                if message["type"] == "WorkflowUpdated" and \
                        message["payload"]["workflow_id"] == created["aggregate_id"]:
                    break
    async with websockets.connect(f"{url}?token=forged") as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


async def test_without_redis_reads_still_answer_and_without_opensearch_search_says_503(
    tenant: Tenant, isolated: Settings,
) -> None:
    workflow_id, _ = await tenant.submitted_workflow()
    broken = isolated.model_copy(update={"redis_url": "redis://127.0.0.1:1/0",
                                         "opensearch_url": "http://127.0.0.1:1"})
    with component("query-api", broken, "RINGIFLOW_QUERY_API_PORT") as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            detail = await get(client, tenant, tenant.initiator, f"/workflows/{workflow_id}")
            assert detail.status_code == 200
            assert detail.json()["workflow"]["status"] == "in_progress"
            assert detail.json()["source"] == "event_store"
            listed = await get(client, tenant, tenant.initiator, "/workflows")
            assert listed.status_code == 200
            stats = await get(client, tenant, tenant.initiator, "/dashboard/stats")
            assert stats.status_code == 200 and stats.json()["source"] == "postgres"
            search = await get(client, tenant, tenant.initiator, "/search", q="ノートPC")
            assert search.status_code == 503
            assert search.json()["code"] == "search_unavailable"
            assert "every other query still works" in search.json()["detail"]
            ready = await client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "degraded"


def test_openapi_documents_every_route(system: dict[str, str]) -> None:
    spec = httpx.get(system["queries"] + "/openapi.json").json()
    for path in ("/workflows", "/workflows/{workflow_id}", "/workflows/{workflow_id}/history",
                 "/my-tasks", "/dashboard/stats", "/search"):
        assert Q + path in spec["paths"], path



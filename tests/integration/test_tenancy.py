"""Tenant-safe identity and fair live updates, on the full pipeline.

The cross-tenant matrix: every route of both APIs, and the WebSocket, used by
tenant B on tenant A's ids, answers exactly as it does for ids nobody holds --
so B can neither touch A's data nor learn which ids A holds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import orjson
import psycopg
import pytest
import redis
import websockets

from infra.settings import Settings, libpq_url
from tests.conftest import TEST_JWT_SECRET, component
from tests.helpers import COMMANDS, Person, Tenant

pytestmark = pytest.mark.slow
Q = "/api/v1/queries"


@pytest.fixture
async def two(system: dict[str, str], isolated: Settings) -> AsyncIterator[tuple[Tenant, Tenant]]:
    async with httpx.AsyncClient(base_url=system["commands"], timeout=30) as client:
        a = await Tenant(client, TEST_JWT_SECRET, isolated.database_url or "").setup()
        b = await Tenant(client, TEST_JWT_SECRET, isolated.database_url or "").setup()
        yield a, b


async def test_two_tenants_hold_the_same_user_id(two: tuple[Tenant, Tenant],
                                                 system: dict[str, str]) -> None:
    a, b = two
    shared = uuid4()
    for tenant, name in ((a, "Aさん"), (b, "Bさん")):
        created = await tenant.post(tenant.admin, "/users", {
            "user_id": str(shared), "display_name": name, "email": "same@example.jp"})
        assert created.status_code == 201, created.text
    # Each tenant renames its own user; neither sees a conflict from the other.
    renamed = await a.ok(a.admin, f"/users/{shared}/rename", {"display_name": "Aさん改"})
    assert renamed["version"] == 2
    assert (await b.ok(b.admin, f"/users/{shared}/rename",
                       {"display_name": "Bさん改"}))["version"] == 2
    # Both can be assigned work in their own tenant, and each read model row is its own.
    for tenant in (a, b):
        definition = await tenant.ok(tenant.admin, "/definitions", {
            "name": "共有ID", "steps": [{"name": "承認", "assignee_id": str(shared)}]})
        created = await tenant.ok(tenant.initiator, "/workflows", {
            "definition_id": definition["aggregate_id"], "title": "同じ利用者ID"})
        await tenant.ok(tenant.initiator, f"/workflows/{created['aggregate_id']}/submit")
    async with httpx.AsyncClient(base_url=system["queries"], timeout=30) as q:
        for tenant, name in ((a, "Aさん改"), (b, "Bさん改")):
            person = Person(tenant.tenant_id, name, user_id=shared)
            for _ in range(100):
                listed = await q.get(Q + "/workflows", params={"assignee": str(shared)},
                                     headers=tenant.headers(tenant.initiator))
                items = listed.json()["items"]
                if items and items[0]["current_assignee_name"] == name:
                    break
                await asyncio.sleep(0.1)
            assert [i["current_assignee_name"] for i in items] == [name]
            tasks = await q.get(Q + "/my-tasks", headers=tenant.headers(person))
            assert [t["workflow_title"] for t in tasks.json()["items"]] == ["同じ利用者ID"]
    with psycopg.connect(libpq_url(a.database_url)) as conn:
        rows = conn.execute("SELECT tenant_id, display_name FROM read_model.users "
                            "WHERE id = %s ORDER BY display_name", (shared,)).fetchall()
    assert sorted(name for _t, name in rows) == ["Aさん改", "Bさん改"]


async def test_an_id_held_by_another_tenant_answers_like_a_free_one(
    two: tuple[Tenant, Tenant], system: dict[str, str],
) -> None:
    """The matrix: B on A's ids vs B on fresh ids, route by route; nothing of A changes."""
    a, b = two
    workflow_id, steps = await a.submitted_workflow()
    a_ids = {"user_id": a.initiator.user_id, "workflow_id": workflow_id, "step_id": steps[0],
             "definition_id": a.definition_id}
    before = await a.events()

    def bodies(ids: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        w, s = ids["workflow_id"], ids["step_id"]
        return [
            (f"/users/{ids['user_id']}/rename", {"display_name": "乗っ取り"}),
            (f"/users/{ids['user_id']}/notification-preferences",
             {"locale": "en", "channels": ["email"]}),
            # registering a user under any id A holds (a user's, a workflow's, a definition's)
            ("/users", {"user_id": str(ids["user_id"]), "display_name": "x",
                        "email": "x@example.jp"}),
            ("/users", {"user_id": str(w), "display_name": "x", "email": "x@example.jp"}),
            ("/users", {"user_id": str(ids["definition_id"]), "display_name": "x",
                        "email": "x@example.jp"}),
            ("/definitions", {"name": "x", "steps": [{"name": "x",
                                                       "assignee_id": str(ids["user_id"])}]}),
            ("/workflows", {"definition_id": str(ids["definition_id"]), "title": "x"}),
            (f"/workflows/{w}/submit", {}),
            (f"/workflows/{w}/resubmit", {"comment": "x"}),
            (f"/workflows/{w}/cancel", {"reason": "x"}),
            (f"/workflows/{w}/comments", {"body": "x"}),
            (f"/workflows/{w}/documents", {"filename": "a.pdf", "content_type":
                                           "application/pdf", "size_bytes": 1}),
            (f"/workflows/{w}/steps/{s}/approve", {}),
            (f"/workflows/{w}/steps/{s}/reject", {"comment": "x"}),
            (f"/workflows/{w}/steps/{s}/request-changes", {"comment": "x"}),
            (f"/workflows/{w}/steps/{s}/delegate", {"delegate_to": str(b.approver1.user_id)}),
        ]

    def fresh() -> dict[str, Any]:
        return {k: uuid4() for k in a_ids}

    async with httpx.AsyncClient() as http:
        spec = (await http.get(system["commands"] + "/openapi.json")).json()
    covered = {path for path, _ in bodies(a_ids)}
    templated = {p.replace(COMMANDS, "") for p in spec["paths"] if p.startswith(COMMANDS)}
    concrete = {p.format(**{k: a_ids[k] for k in ("user_id", "workflow_id", "step_id")})
                for p in templated}
    assert concrete <= covered, f"routes missing from the matrix: {concrete - covered}"

    for who in (b.approver1, b.admin):
        for (path, theirs), (free_path, free) in zip(bodies(a_ids), bodies(fresh()),
                                                      strict=True):
            on_a = await b.post(who, path, theirs)
            on_free = await b.post(who, free_path, free)
            assert on_a.status_code == on_free.status_code, (path, on_a.text, on_free.text)
            if on_a.status_code >= 400:
                assert on_a.json()["code"] == on_free.json()["code"], (path, on_a.text)
    assert await a.events() == before, "tenant B changed tenant A's streams"

    async with httpx.AsyncClient(base_url=system["queries"], timeout=30) as q:
        reads = ["/workflows/{w}", "/workflows/{w}/history",
                 "/workflows/{w}?as_of=2100-01-01T00:00:00Z", "/workflows/{w}/completion"]
        for template in reads:
            on_a = await q.get(Q + template.format(w=workflow_id), headers=b.headers(b.admin))
            on_free = await q.get(Q + template.format(w=uuid4()), headers=b.headers(b.admin))
            assert (on_a.status_code, on_a.json()["code"]) == \
                (on_free.status_code, on_free.json()["code"]) == (404, "not_found"), template
        lists = [("/workflows", {"initiator": str(a.initiator.user_id)}),
                 ("/workflows", {"assignee": str(a.approver1.user_id)}),
                 ("/my-tasks", {}), ("/search", {"q": "ノートPC"}), ("/dashboard/stats", {}),
                 ("/notifications", {"workflow_id": str(workflow_id)})]
        a_token = (await a.ok(a.initiator, f"/workflows/{workflow_id}/comments",
                              {"body": "見えますか"}))["consistency_token"]
        for path, params in lists:
            person = Person(b.tenant_id, "なりすまし", user_id=a.approver1.user_id)
            got = await q.get(Q + path, params={**params, "after": a_token, "wait_ms": 200},
                              headers=b.headers(person))
            assert got.status_code == 200, (path, got.text)
            body = got.json()
            assert str(workflow_id) not in got.text, (path, got.text)
            if "items" in body:
                assert body["items"] == [], (path, body)
            # A's token is just an unknown write to B: never "reached" on A's data.
            assert got.headers.get("X-Consistency") in (None, "timeout"), path


async def test_a_websocket_sees_only_its_own_tenant(two: tuple[Tenant, Tenant],
                                                    system: dict[str, str]) -> None:
    """B's token whose subject is A's user id hears nothing of A."""
    a, b = two
    url = system["queries"].replace("http", "ws") + Q + "/ws"
    impostor = Person(b.tenant_id, "なりすまし", user_id=a.initiator.user_id)
    async with websockets.connect(f"{url}?token={impostor.token(TEST_JWT_SECRET)}") as ws:
        assert orjson.loads(await ws.recv())["type"] == "Subscribed"
        secret = await a.create_workflow("極秘の稟議")
        await a.ok(a.initiator, f"/workflows/{secret['aggregate_id']}/submit")
        mine = await b.create_workflow("Bの稟議")  # proves the socket is live
        seen = []
        async with asyncio.timeout(30):
            while True:
                message = orjson.loads(await ws.recv())
                seen.append(message)
                if message.get("payload", {}).get("workflow_id") == mine["aggregate_id"]:
                    break
        assert "極秘" not in orjson.dumps(seen).decode()
        assert all(m.get("payload", {}).get("workflow_id") != secret["aggregate_id"]
                   for m in seen)


@pytest.fixture(scope="module")
def limited(isolated: Settings) -> Any:
    """A query API with small fair shares, so a flood is cheap to make."""
    with component("query-api", isolated, "RINGIFLOW_QUERY_API_PORT",
                   RINGIFLOW_WS_MAX_PER_USER="3", RINGIFLOW_WS_MAX_PER_TENANT="5",
                   RINGIFLOW_CONSISTENCY_WAITS_PER_USER="2",
                   RINGIFLOW_CONSISTENCY_WAITS_PER_TENANT="3") as base:
        yield base


async def refused(ws: Any) -> websockets.frames.Close | None:
    """The close frame if the server refused the socket, else None (it subscribed)."""
    try:
        first = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
    except websockets.ConnectionClosed as closed:
        return closed.rcvd
    assert first["type"] == "Subscribed", first
    return None


async def test_a_websocket_flood_from_one_tenant_leaves_another_live(
    two: tuple[Tenant, Tenant], limited: str, isolated: Settings,
) -> None:
    a, b = two
    url = limited.replace("http", "ws") + Q + "/ws"
    flooders = [Person(a.tenant_id, f"flood{i}") for i in range(3)]
    sockets, closes = [], []
    try:
        for person in flooders:
            for _ in range(4):  # one more than a user may hold
                ws = await websockets.connect(f"{url}?token={person.token(TEST_JWT_SECRET)}")
                sockets.append(ws)
                closes.append(await refused(ws))
        accepted = [c for c in closes if c is None]
        assert len(accepted) == 5, closes  # the tenant's share
        reasons = [c.reason for c in closes if c is not None]
        assert all(c.code == 1013 for c in closes if c is not None)
        assert any("for this user (limit 3)" in r for r in reasons), reasons
        assert any("for this tenant (limit 5)" in r for r in reasons), reasons
        # One Redis subscription per process, however many sockets listen.
        client = redis.Redis.from_url(isolated.redis_url or "")
        assert dict(client.pubsub_numsub(f"tenant:{a.tenant_id}"))[
            f"tenant:{a.tenant_id}".encode()] == 1
        client.close()
        # Tenant B is untouched by A's flood: it connects and hears its own update.
        token = b.initiator.token(TEST_JWT_SECRET)
        async with websockets.connect(f"{url}?token={token}") as ws:
            assert await refused(ws) is None
            created = await b.create_workflow("洪水の中で")
            async with asyncio.timeout(30):
                while True:
                    message = orjson.loads(await ws.recv())
                    if message.get("payload", {}).get("workflow_id") == created["aggregate_id"]:
                        break
    finally:
        for ws in sockets:
            await ws.close()
    # Closed sockets give their share back.
    await asyncio.sleep(0.5)
    async with websockets.connect(f"{url}?token={flooders[0].token(TEST_JWT_SECRET)}") as ws:
        assert await refused(ws) is None


async def test_a_websocket_closes_when_its_token_expires(two: tuple[Tenant, Tenant],
                                                        limited: str) -> None:
    from datetime import timedelta

    from infra.auth import mint_token

    a, _ = two
    token = mint_token(TEST_JWT_SECRET, tenant_id=a.tenant_id, user_id=a.initiator.user_id,
                       name="短命", roles=["user"], ttl=timedelta(seconds=2))
    url = limited.replace("http", "ws") + Q + "/ws"
    started = asyncio.get_running_loop().time()
    async with websockets.connect(f"{url}?token={token}") as ws:
        assert await refused(ws) is None
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with asyncio.timeout(15):
                while True:
                    await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    assert "expired" in closed.value.rcvd.reason
    assert asyncio.get_running_loop().time() - started < 10


async def test_consistency_waits_are_capped_per_user_and_honest(
    two: tuple[Tenant, Tenant], limited: str,
) -> None:
    from contract import ConsistencyToken

    a, b = two
    created = await a.create_workflow("待ち")
    real = ConsistencyToken.decode(created["consistency_token"])
    never = ConsistencyToken(real.aggregate_type, real.aggregate_id, 99).encode()
    async with httpx.AsyncClient(base_url=limited, timeout=30) as q:
        async def wait(person: Person, tenant: Tenant, ms: int) -> httpx.Response:
            return await q.get(Q + "/workflows", params={"after": never, "wait_ms": ms},
                               headers=tenant.headers(person))

        started = asyncio.get_running_loop().time()
        answers = await asyncio.gather(*(wait(a.initiator, a, 1500) for _ in range(3)))
        elapsed = asyncio.get_running_loop().time() - started
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [200, 200, 429], [r.text for r in answers]
        too_many = next(r for r in answers if r.status_code == 429)
        assert too_many.json()["code"] == "too_many_waits"
        assert "limit 2" in too_many.json()["detail"] and too_many.headers["Retry-After"]
        for r in answers:
            if r.status_code == 200:
                assert r.headers["X-Consistency"] == "timeout"
                assert 1500 <= int(r.headers["X-Consistency-Waited-Ms"]) < 2500
        assert elapsed < 4, f"a 1.5 s wait took {elapsed:.1f} s"
        # Another tenant's reads do not queue behind A's waits.
        other = await asyncio.gather(wait(a.approver1, a, 1000), wait(a.approver2, a, 1000),
                                     q.get(Q + "/workflows", headers=b.headers(b.initiator)))
        assert other[2].status_code == 200
        assert sorted(r.status_code for r in other[:2]) == [200, 200]


async def test_a_forged_token_on_search_does_not_flood_the_log(
    two: tuple[Tenant, Tenant], limited: str, isolated: Settings,
) -> None:
    from contract import AggregateType as Kind
    from contract import ConsistencyToken

    a, _ = two
    def log_sizes() -> dict[Path, int]:
        return {p: p.stat().st_size for p in Path(isolated.data_dir).glob("query-api-*.log")}

    sizes = log_sizes()
    forged = ConsistencyToken(Kind.WORKFLOW, uuid4(), 5).encode()
    async with httpx.AsyncClient(base_url=limited, timeout=30) as q:
        found = await q.get(Q + "/search", params={"q": "x", "after": forged, "wait_ms": 1500},
                            headers=a.headers(a.initiator))
    assert found.status_code == 200 and found.headers["X-Consistency"] == "timeout"
    grown = sum(size - sizes.get(p, 0) for p, size in log_sizes().items())
    assert grown < 2000, f"one search with a forged token wrote {grown} bytes of log"


def test_an_api_key_does_not_override_a_bearer_token(command_api: str) -> None:
    """An X-API-Key beside a valid bearer token must not decide who the caller is."""
    from infra.auth import mint_token

    tenant, user = uuid4(), uuid4()
    token = mint_token(TEST_JWT_SECRET, tenant_id=tenant, user_id=user, name="x",
                       roles=["user"])
    created = httpx.post(command_api + COMMANDS + "/users", headers={
        "Authorization": f"Bearer {token}", "X-API-Key": "not-a-key"},
        json={"display_name": "x", "email": "x@example.jp"})
    # the bearer decided: a plain user may not register users (403), not "unknown API key"
    assert created.status_code == 403, created.text

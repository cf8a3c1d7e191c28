"""The command API over real HTTP against the embedded PostgreSQL."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID, uuid4

import httpx
import jwt
import psycopg
import pytest

from contract import ConsistencyToken, decode_envelope
from infra.auth import hash_api_key
from infra.settings import Settings, libpq_url
from tests.conftest import TEST_JWT_SECRET, component, settings_env
from tests.helpers import COMMANDS, Person, Tenant

PROBLEM = "application/problem+json"


@pytest.fixture
async def client(command_api: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=command_api, timeout=30) as client:
        yield client


@pytest.fixture
async def tenant(client: httpx.AsyncClient, settings: Settings) -> Tenant:
    return await Tenant(client, TEST_JWT_SECRET, settings.database_url or "").setup()


async def test_a_workflow_runs_from_draft_to_approved(tenant: Tenant) -> None:
    created = await tenant.create_workflow()
    workflow_id = UUID(created["aggregate_id"])
    assert created["version"] == 1 and len(created["event_ids"]) == 1
    token = ConsistencyToken.decode(created["consistency_token"])
    assert (token.aggregate_id, token.version) == (workflow_id, 1)

    submitted = await tenant.ok(tenant.initiator, f"/workflows/{workflow_id}/submit")
    assert submitted["version"] == 3  # WorkflowSubmitted + WorkflowStepAssigned
    step1, step2 = await tenant.step_ids(workflow_id)
    first = await tenant.ok(tenant.approver1, f"/workflows/{workflow_id}/steps/{step1}/approve",
                            {"comment": "問題なし"})
    assert first["version"] == 5
    final = await tenant.ok(tenant.approver2, f"/workflows/{workflow_id}/steps/{step2}/approve")
    assert final["version"] == 7

    events = await tenant.events(workflow_id)
    assert [e["event_type"] for e in events] == [
        "WorkflowCreated", "WorkflowSubmitted", "WorkflowStepAssigned", "WorkflowStepCompleted",
        "WorkflowStepAssigned", "WorkflowStepCompleted", "WorkflowApproved"]
    assert [e["version"] for e in events] == list(range(1, 8))
    assert events[-1]["aggregate"]["status"] == "approved"
    assert events[2]["payload"]["assignee_name"] == "承認 一郎"
    assert [str(e["event_id"]) for e in events[-2:]] == final["event_ids"]
    meta = events[0]["metadata"]
    assert meta["tenant_id"] == str(tenant.tenant_id)
    assert meta["user_id"] == str(tenant.initiator.user_id)


async def test_every_event_gets_an_outbox_row_with_the_exact_envelope_and_headers(
    tenant: Tenant,
) -> None:
    workflow_id, _ = await tenant.submitted_workflow()
    events = await tenant.events(workflow_id)
    async with await psycopg.AsyncConnection.connect(libpq_url(tenant.database_url)) as conn:
        cur = await conn.execute(
            "SELECT event_id, topic, payload, metadata, status FROM event_store.outbox "
            "WHERE aggregate_id = %s ORDER BY version", (workflow_id,))
        rows = await cur.fetchall()
    assert [r[0] for r in rows] == [e["event_id"] for e in events]
    for (_event_id, topic, payload, headers, status), event in zip(rows, events, strict=True):
        assert topic == "ringiflow.workflow.events" and status == "pending"
        envelope = decode_envelope(payload)
        assert envelope.version == event["version"]
        assert envelope.aggregate == event["aggregate"]
        assert headers["tenant_id"] == str(tenant.tenant_id)
        assert headers["traceparent"].startswith("00-")


async def test_correlation_and_trace_ids_flow_into_the_events(tenant: Tenant) -> None:
    correlation = str(uuid4())
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = await tenant.post(
        tenant.initiator, "/workflows",
        {"definition_id": str(tenant.definition_id), "title": "出張申請"},
        **{"X-Correlation-ID": correlation,
           "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert response.status_code == 201
    assert response.headers["X-Correlation-ID"] == correlation
    event = (await tenant.events(UUID(response.json()["aggregate_id"])))[0]
    assert event["metadata"]["correlation_id"] == correlation
    assert event["metadata"]["trace_id"] == trace_id


# --- refusals -----------------------------------------------------------------------


async def assert_refused(tenant: Tenant, person: Person, path: str, status: int, code: str,
                         body: dict | None = None) -> dict:
    before = await tenant.counts()
    response = await tenant.post(person, path, body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    problem = response.json()
    assert problem["code"] == code and problem["status"] == status and problem["detail"]
    assert await tenant.counts() == before, "a refused command wrote something"
    return problem


async def test_business_rules_refuse_with_reasons_and_write_nothing(tenant: Tenant) -> None:
    workflow_id, (step1, step2) = await tenant.submitted_workflow()
    wf = f"/workflows/{workflow_id}"
    await assert_refused(tenant, tenant.approver1, f"{wf}/cancel", 403, "forbidden")
    await assert_refused(tenant, tenant.approver2, f"{wf}/steps/{step1}/approve", 403,
                         "forbidden")
    await assert_refused(tenant, tenant.approver1, f"{wf}/steps/{step2}/approve", 409,
                         "invalid_state")
    await assert_refused(tenant, tenant.approver1, f"{wf}/steps/{uuid4()}/approve", 422,
                         "invalid_command")
    await assert_refused(tenant, tenant.initiator, f"{wf}/submit", 409, "invalid_state")
    await assert_refused(tenant, tenant.initiator, f"/workflows/{uuid4()}/submit", 404,
                         "not_found")
    await tenant.ok(tenant.approver1, f"{wf}/steps/{step1}/reject", {"comment": "予算超過"})
    problem = await assert_refused(tenant, tenant.initiator, f"{wf}/comments", 409,
                                   "invalid_state", {"body": "再考を"})
    assert "rejected" in problem["detail"]


async def test_delegation_moves_the_step_to_the_delegate(tenant: Tenant) -> None:
    workflow_id, (step1, _) = await tenant.submitted_workflow()
    await tenant.ok(tenant.approver1, f"/workflows/{workflow_id}/steps/{step1}/delegate",
                    {"delegate_to": str(tenant.approver2.user_id), "comment": "出張中"})
    await assert_refused(tenant, tenant.approver1,
                         f"/workflows/{workflow_id}/steps/{step1}/approve", 403, "forbidden")
    await tenant.ok(tenant.approver2, f"/workflows/{workflow_id}/steps/{step1}/approve")
    await assert_refused(
        tenant, tenant.approver1, f"/workflows/{workflow_id}/steps/{step1}/delegate", 422,
        "unknown_reference", {"delegate_to": str(uuid4())})


async def test_changes_requested_then_resubmitted(tenant: Tenant) -> None:
    workflow_id, (step1, _) = await tenant.submitted_workflow()
    wf = f"/workflows/{workflow_id}"
    await tenant.ok(tenant.approver1, f"{wf}/steps/{step1}/request-changes",
                    {"comment": "見積書を添付してください"})
    await tenant.ok(tenant.initiator, f"{wf}/documents", {
        "filename": "見積書.pdf", "content_type": "application/pdf", "size_bytes": 12345})
    await tenant.ok(tenant.initiator, f"{wf}/resubmit", {"comment": "添付しました"})
    await tenant.ok(tenant.approver1, f"{wf}/steps/{step1}/approve")
    events = await tenant.events(workflow_id)
    assert events[-1]["aggregate"]["status"] == "in_progress"
    assert events[-1]["aggregate"]["current_assignee_id"] == str(tenant.approver2.user_id)


async def test_only_admins_manage_the_directory(tenant: Tenant) -> None:
    await assert_refused(tenant, tenant.initiator, "/users", 403, "forbidden",
                         {"display_name": "x", "email": "x@example.jp"})
    # ...but anyone may rename themselves.
    await tenant.ok(tenant.initiator, f"/users/{tenant.initiator.user_id}/rename",
                    {"display_name": "申請 花子"})


async def test_unknown_references_are_422_naming_the_field(tenant: Tenant) -> None:
    problem = await assert_refused(tenant, tenant.initiator, "/workflows", 422,
                                   "unknown_reference",
                                   {"definition_id": str(uuid4()), "title": "x"})
    assert "definition_id" in problem["detail"]
    problem = await assert_refused(tenant, tenant.admin, "/definitions", 422,
                                   "unknown_reference",
                                   {"name": "d", "steps": [{"name": "s",
                                                            "assignee_id": str(uuid4())}]})
    assert "assignee_id" in problem["detail"]


# --- validation ---------------------------------------------------------------------


@pytest.mark.parametrize(("body", "field"), [
    ({"title": "x", "surprise": 1}, "surprise"),
    ({"title": ""}, "title"),
    ({"title": "x" * 501}, "title"),
    ({"title": "x", "priority": "asap"}, "priority"),
    ({"title": "x", "due_date": "2030-01-01T00:00:00"}, "due_date"),
    ({"title": "x", "description": "y" * 10_001}, "description"),
    ({"title": "x", "documents": [{"filename": "a", "content_type": "nope",
                                   "size_bytes": 1}]}, "documents[0].content_type"),
    ({"title": "x", "expected_version": -1}, "expected_version"),
])
async def test_invalid_bodies_are_422_problems_naming_the_field(
    tenant: Tenant, body: dict, field: str,
) -> None:
    body = {"definition_id": str(tenant.definition_id), **body}
    problem = await assert_refused(tenant, tenant.initiator, "/workflows", 422,
                                   "validation_error", body)
    assert field in {e["field"] for e in problem["errors"]}, problem
    assert field in problem["detail"]


async def test_malformed_json_and_bad_ids_are_422(tenant: Tenant) -> None:
    response = await tenant.client.post(
        COMMANDS + "/workflows", content=b"{not json",
        headers=tenant.headers(tenant.initiator, **{"Content-Type": "application/json"}))
    assert response.status_code == 422
    assert response.headers["content-type"].startswith(PROBLEM)
    response = await tenant.post(tenant.initiator, "/workflows/not-a-uuid/submit")
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "workflow_id"


async def test_a_past_due_date_is_refused_by_the_domain(tenant: Tenant) -> None:
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    await assert_refused(tenant, tenant.initiator, "/workflows", 422, "invalid_command",
                         {"definition_id": str(tenant.definition_id), "title": "x",
                          "due_date": past})


async def test_steps_are_bounded(tenant: Tenant) -> None:
    steps = [{"name": f"s{i}", "assignee_id": str(tenant.approver1.user_id)} for i in range(21)]
    for bad in ([], steps):
        await assert_refused(tenant, tenant.admin, "/definitions", 422, "validation_error",
                             {"name": "d", "steps": bad})


# --- authentication and tenant isolation ---------------------------------------------


async def test_missing_and_bad_tokens_are_401(tenant: Tenant, client: httpx.AsyncClient) -> None:
    path = COMMANDS + "/workflows"
    body = {"definition_id": str(tenant.definition_id), "title": "x"}
    now = datetime.now(UTC)
    claims = {"sub": str(tenant.initiator.user_id), "tenant_id": str(tenant.tenant_id),
              "name": "x", "iss": "ringiflow", "aud": "ringiflow"}
    bad_tokens = {
        "wrong secret": jwt.encode({**claims, "exp": now + timedelta(hours=1)},
                                   "not-the-secret" * 4, algorithm="HS256"),
        "expired": jwt.encode({**claims, "exp": now - timedelta(hours=1)}, TEST_JWT_SECRET,
                              algorithm="HS256"),
        "no tenant": jwt.encode({"sub": claims["sub"], "iss": "ringiflow", "aud": "ringiflow",
                                 "exp": now + timedelta(hours=1)}, TEST_JWT_SECRET,
                                algorithm="HS256"),
        "alg none": jwt.encode({**claims, "exp": now + timedelta(hours=1)}, None,
                               algorithm="none"),
    }
    before = await tenant.counts()
    response = await client.post(path, json=body)
    assert response.status_code == 401 and "Bearer" in response.headers["www-authenticate"]
    assert "ringiflow token" in response.json()["detail"]
    for why, token in bad_tokens.items():
        response = await client.post(path, json=body, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, why
        assert response.headers["content-type"].startswith(PROBLEM)
    response = await client.post(path, json=body, headers={"Authorization": "Basic abc"})
    assert response.status_code == 401
    assert await tenant.counts() == before


async def test_another_tenant_can_neither_see_nor_change_an_aggregate(
    tenant: Tenant, client: httpx.AsyncClient, settings: Settings,
) -> None:
    workflow_id, (step1, _) = await tenant.submitted_workflow()
    intruder_tenant = await Tenant(client, TEST_JWT_SECRET, settings.database_url or "").setup()
    # Same user id as the real assignee, other tenant: still nothing.
    intruder = Person(intruder_tenant.tenant_id, "侵入者", ["admin"],
                      user_id=tenant.approver1.user_id)
    before = await tenant.counts()
    for path, body in [(f"/workflows/{workflow_id}/steps/{step1}/approve", {}),
                       (f"/workflows/{workflow_id}/comments", {"body": "hi"}),
                       (f"/workflows/{workflow_id}/cancel", {})]:
        response = await intruder_tenant.post(intruder, path, body)
        assert response.status_code == 404, response.text
        assert tenant.definition_id is not None
        assert "ノートPC" not in response.text
    response = await intruder_tenant.post(intruder, "/workflows", {
        "definition_id": str(tenant.definition_id), "title": "x"})
    assert response.status_code == 422 and response.json()["code"] == "unknown_reference"
    assert await tenant.counts() == before


async def test_service_api_keys_authenticate_for_their_tenant(settings: Settings) -> None:
    tenant_id, key = uuid4(), "svc-" + uuid4().hex
    api_keys = f'[{{"sha256": "{hash_api_key(key)}", "tenant_id": "{tenant_id}", ' \
               '"service": "hr-sync", "roles": ["service"]}]'
    with component("command-api", settings, "RINGIFLOW_COMMAND_API_PORT",
                   RINGIFLOW_API_KEYS=api_keys) as base:
        async with httpx.AsyncClient(base_url=base) as client:
            body = {"display_name": "連携 ユーザー", "email": "sync@example.jp"}
            response = await client.post(COMMANDS + "/users", json=body,
                                         headers={"X-API-Key": key})
            assert response.status_code == 201, response.text
            response = await client.post(COMMANDS + "/users", json=body,
                                         headers={"X-API-Key": key + "x"})
            assert response.status_code == 401


def test_cli_token_is_accepted_by_the_running_api(command_api: str, settings: Settings) -> None:
    tenant_id, user_id = uuid4(), uuid4()
    result = subprocess.run(
        [sys.executable, "-m", "ringiflow", "token", "--tenant", str(tenant_id), "--user",
         str(user_id), "--role", "admin", "--name", "運用者"],
        env=settings_env(settings), capture_output=True, text=True, check=True)
    token = result.stdout.strip()
    response = httpx.post(command_api + COMMANDS + "/users", json={
        "user_id": str(user_id), "display_name": "運用者", "email": "ops@example.jp"},
        headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 201, response.text


# --- concurrency, expected_version, idempotency --------------------------------------


async def test_racing_commands_on_one_aggregate_exactly_one_wins(tenant: Tenant) -> None:
    created = await tenant.create_workflow()
    workflow_id = created["aggregate_id"]
    results = await asyncio.gather(*(
        tenant.post(tenant.initiator, f"/workflows/{workflow_id}/comments",
                    {"body": f"コメント {i}", "expected_version": 1})
        for i in range(12)))
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200] + [409] * 11, statuses
    for response in results:
        if response.status_code == 409:
            assert response.json()["current_version"] == 2
    assert len(await tenant.events(UUID(workflow_id))) == 2


async def test_racing_commands_without_expected_version_never_fork_the_stream(
    tenant: Tenant,
) -> None:
    workflow_id = (await tenant.create_workflow())["aggregate_id"]
    results = await asyncio.gather(*(
        tenant.post(tenant.initiator, f"/workflows/{workflow_id}/comments", {"body": str(i)})
        for i in range(12)))
    winners = [r for r in results if r.status_code == 200]
    assert winners and all(r.status_code in (200, 409) for r in results)
    events = await tenant.events(UUID(workflow_id))
    assert [e["version"] for e in events] == list(range(1, len(winners) + 2))


async def test_expected_version_mismatch_is_409_with_the_current_version(tenant: Tenant) -> None:
    workflow_id = (await tenant.create_workflow())["aggregate_id"]
    problem = await assert_refused(tenant, tenant.initiator, f"/workflows/{workflow_id}/submit",
                                   409, "version_conflict", {"expected_version": 7})
    assert problem["current_version"] == 1
    await tenant.ok(tenant.initiator, f"/workflows/{workflow_id}/submit",
                    {"expected_version": 1})


async def test_a_retried_request_returns_the_first_response_and_appends_nothing(
    tenant: Tenant,
) -> None:
    body = {"definition_id": str(tenant.definition_id), "title": "再送テスト"}
    key = {"Idempotency-Key": f"create-{uuid4()}"}
    first = await tenant.post(tenant.initiator, "/workflows", body, **key)
    assert first.status_code == 201
    before = await tenant.counts()
    again = await tenant.post(tenant.initiator, "/workflows", body, **key)
    assert again.status_code == 201 and again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await tenant.counts() == before

    changed = await tenant.post(tenant.initiator, "/workflows", {**body, "title": "別物"}, **key)
    assert changed.status_code == 422 and changed.json()["code"] == "idempotency_key_reused"
    assert await tenant.counts() == before


async def test_concurrent_retries_with_one_key_execute_once(tenant: Tenant) -> None:
    body = {"definition_id": str(tenant.definition_id), "title": "同時再送"}
    key = {"Idempotency-Key": f"burst-{uuid4()}"}
    before = await tenant.counts()
    results = await asyncio.gather(*(tenant.post(tenant.initiator, "/workflows", body, **key)
                                     for _ in range(8)))
    assert {r.status_code for r in results} == {201}
    assert len({r.json()["aggregate_id"] for r in results}) == 1
    events, outbox, keys = await tenant.counts()
    assert (events, outbox, keys) == (before[0] + 1, before[1] + 1, before[2] + 1)


async def test_a_failed_command_does_not_burn_its_idempotency_key(tenant: Tenant) -> None:
    workflow_id, (step1, _) = await tenant.submitted_workflow()
    key = {"Idempotency-Key": f"approve-{uuid4()}"}
    path = f"/workflows/{workflow_id}/steps/{step1}/approve"
    assert (await tenant.post(tenant.approver2, path, {}, **key)).status_code == 403
    assert (await tenant.post(tenant.approver1, path, {}, **key)).status_code == 200


async def test_a_flood_beyond_the_pool_queue_is_refused_at_once_and_writes_nothing(
        settings: Settings) -> None:
    """One connection and two waiting: the rest of sixty concurrent commands are
    refused with 503 overloaded instead of queueing for the pool's 10 s; each refused
    one wrote nothing, and sent again with its Idempotency-Key it is written once."""
    with component("command-api", settings, "RINGIFLOW_COMMAND_API_PORT",
                   RINGIFLOW_COMMAND_API_PROCESSES="1", RINGIFLOW_COMMAND_DB_POOL_SIZE="1",
                   RINGIFLOW_COMMAND_DB_MAX_WAITING="2") as base:
        async with httpx.AsyncClient(base_url=base, timeout=30,
                                     limits=httpx.Limits(max_connections=100)) as client:
            tenant = await Tenant(client, TEST_JWT_SECRET, settings.database_url or "").setup()
            before = await tenant.counts()
            keys = [f"flood-{uuid4().hex}" for _ in range(60)]

            async def create(key: str) -> httpx.Response:
                return await tenant.post(tenant.initiator, "/workflows", {
                    "definition_id": str(tenant.definition_id), "title": "殺到"},
                    **{"Idempotency-Key": key})

            results = await asyncio.gather(*(create(k) for k in keys))
            statuses = [r.status_code for r in results]
            assert set(statuses) == {201, 503}, statuses
            refused = [k for k, r in zip(keys, results, strict=True) if r.status_code == 503]
            for r in results:
                if r.status_code == 503:
                    assert r.json()["code"] == "overloaded", r.text
                    assert r.headers["retry-after"] == "1"
                    assert "nothing was written" in r.json()["detail"]
            written = len(keys) - len(refused)
            after = await tenant.counts()
            assert [a - b for a, b in zip(after, before, strict=True)] == [written] * 3
            metrics = (await client.get("/metrics")).text
            assert f"ringiflow_requests_shed_total {float(len(refused))}" in metrics

            log = Path(settings.data_dir, f"command-api-{base.rsplit(':', 1)[1]}.log")
            text = await asyncio.to_thread(log.read_text)
            assert "Traceback" not in text, "an expected refusal is no crash"
            for key in refused:  # retried one at a time, as Retry-After asks
                assert (await create(key)).status_code == 201
            final = await tenant.counts()
            assert [a - b for a, b in zip(final, before, strict=True)] == [len(keys)] * 3


def test_an_idle_keep_alive_connection_outlives_a_client_s_own_idle_timeout(
        command_api: str) -> None:
    """uvicorn closed idle connections after 5 s; clients that keep theirs longer
    (aiohttp 15 s) reused closed ones under load and saw resets. Now the server keeps
    them 75 s: a request after 6 s idle is answered on the same connection."""
    host, port = command_api.removeprefix("http://").rsplit(":", 1)
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        for _ in range(2):
            conn.sendall(request)
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                chunk = conn.recv(65536)
                assert chunk, f"the server closed the connection: {answer!r}"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            time.sleep(6)


async def test_a_command_that_finds_no_connection_free_in_time_is_a_busy_503_not_a_reset(
        settings: Settings) -> None:
    """The pool's only connection is held by a command stuck on a lock, so the next one
    waits the pool's 10 s for it: the client gets 503 database_busy with Retry-After,
    not a dropped connection, and the log one line, no traceback."""
    with component("command-api", settings, "RINGIFLOW_COMMAND_API_PORT",
                   RINGIFLOW_COMMAND_API_PROCESSES="1", RINGIFLOW_COMMAND_DB_POOL_SIZE="1",
                   RINGIFLOW_COMMAND_DB_MAX_WAITING="0") as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            tenant = await Tenant(client, TEST_JWT_SECRET, settings.database_url or "").setup()
            async with await psycopg.AsyncConnection.connect(
                    libpq_url(settings.database_url or "")) as blocker:
                await blocker.execute("LOCK TABLE event_store.events IN ACCESS EXCLUSIVE MODE")
                stuck = asyncio.create_task(tenant.create_workflow("ロック待ち"))
                await asyncio.sleep(0.5)
                started = time.monotonic()
                busy = await tenant.post(tenant.initiator, "/workflows", {
                    "definition_id": str(tenant.definition_id), "title": "接続待ち"})
                waited = time.monotonic() - started
                await blocker.rollback()
            assert busy.status_code == 503, busy.text
            assert busy.json()["code"] == "database_busy" and busy.headers["retry-after"] == "1"
            assert 9 < waited < 15, waited
            assert (await stuck)["version"] == 1, "the stuck command lands once the lock goes"
            log = Path(settings.data_dir, f"command-api-{base.rsplit(':', 1)[1]}.log")
            text = await asyncio.to_thread(log.read_text)
            assert "no database connection came free in time" in text
            assert "Traceback" not in text

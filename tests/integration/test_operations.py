"""Operator verbs against running systems."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from uuid import UUID, uuid4

import httpx
import pytest

from infra.settings import Settings
from tests.conftest import TEST_JWT_SECRET, settings_env
from tests.helpers import Tenant
from tests.scenarios import World, build_world

pytestmark = pytest.mark.slow


def ringiflow(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ringiflow", *args],
                          env=settings_env(settings) | env, capture_output=True, text=True,
                          timeout=300)


async def test_lag_is_zero_once_the_workers_caught_up(system: dict[str, str],
                                                      isolated: Settings) -> None:
    async with httpx.AsyncClient(base_url=system["commands"], timeout=30) as client:
        tenant = await Tenant(client, TEST_JWT_SECRET, isolated.database_url or "").setup()
        await tenant.submitted_workflow()
    deadline = time.monotonic() + 60
    while True:
        result = ringiflow(isolated, "lag", "--json", "--max-lag", "0")
        assert result.stdout, result.stderr
        report = json.loads(result.stdout)
        if result.returncode == 0:
            break
        assert time.monotonic() < deadline, report["breaches"]
        await asyncio.sleep(1)
    groups = {p["group"] for p in report["partitions"]}
    assert groups == {"workflow-projector", "cache-projector", "search-indexer",
                      "audit-processor", "notification-processor", "notification-dispatcher",
                      "workflow-completion-saga"}
    assert all(p["lag"] == 0 for p in report["partitions"])
    assert report["outbox"]["pending"] == 0

    # Each group's recent received -> applied delay, asked of the running workers.
    workers_port = system["workers"].rsplit(":", 1)[1]
    result = ringiflow(isolated, "lag", "--json", RINGIFLOW_WORKERS_PORT=workers_port)
    delays = json.loads(result.stdout)["apply_delay"]
    assert set(delays) == groups
    for group in ("workflow-projector", "cache-projector", "search-indexer"):
        assert delays[group]["events"] >= 1, delays
        assert 0 <= delays[group]["p50_ms"] <= delays[group]["p99_ms"] < 60_000
    text = ringiflow(isolated, "lag", RINGIFLOW_WORKERS_PORT=workers_port).stdout
    assert "workflow-projector: lag 0, parked aggregates 0, applied in p50" in text
    unknown = ringiflow(isolated, "lag", RINGIFLOW_WORKERS_PORT="1")
    assert "apply delays: unknown" in unknown.stdout

    # The per-hop histograms behind those figures, at the workers' /metrics.
    async with httpx.AsyncClient(timeout=10) as client:
        metrics = (await client.get(system["workers"] + "/metrics")).text
    for hop in ("consume_delay", "apply_delay", "event_age_at_apply"):
        counted = re.search(rf'^ringiflow_{hop}_seconds_count{{group="workflow-projector"}} '
                            r'([0-9.]+)$', metrics, re.M)
        assert counted and float(counted.group(1)) >= 1, hop


def test_lag_exits_non_zero_when_a_threshold_is_crossed(settings: Settings) -> None:
    from contract import to_record
    from infra.kafka import producer
    from tests.events import comment_envelope

    # No consumer group runs against the session's broker: what is produced is lag.
    record = to_record(comment_envelope(uuid4(), uuid4(), 1))
    unread = producer(settings.kafka_bootstrap or "")
    unread.produce(record.topic, record.value, record.key, headers=list(record.headers))
    assert unread.flush(10) == 0
    result = ringiflow(settings, "lag", "--max-lag", "0")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "ALERT" in result.stderr and "lag" in result.stderr
    assert "workflow-projector" in result.stdout

    time.sleep(1.5)  # the unread event ages
    aged = ringiflow(settings, "lag", "--json", "--max-event-age", "1")
    assert aged.returncode == 1
    report = json.loads(aged.stdout)
    assert any("oldest unprocessed event waits" in b for b in report["breaches"])
    behind = [p for p in report["partitions"] if p["lag"] > 0]
    assert behind and all(p["event_age_s"] is not None and p["event_age_s"] >= 1
                          for p in behind)
    assert all(p["event_age_s"] is None for p in report["partitions"] if p["lag"] == 0)


async def park_one(fresh_db: Settings) -> tuple[UUID, list]:
    """A real dead letter in workflow-projector: one event its store refused."""
    from psycopg_pool import AsyncConnectionPool

    from infra.settings import libpq_url
    from projectors.projection import Projection
    from projectors.workflows.store import WorkflowStore
    from streams.deadletters import DeadLetters
    from streams.processor import Processor
    from streams.wrappers import RetryPolicy
    from tests.integration.test_streams import Flaky, records_of

    world = build_world(workflows=6)
    victim = [e for e in world.events if e.aggregate_type.value == "workflow"][-1].aggregate_id
    stream = [e for e in world.events if e.aggregate_id == victim]
    flaky = Flaky(WorkflowStore(libpq_url(fresh_db.role_database_url("projector"))))
    flaky.refuse.add(stream[1].event_id)
    await flaky.start()
    async with AsyncConnectionPool(libpq_url(fresh_db.role_database_url("projector")),
                                   min_size=1, max_size=2) as pool:
        processor = Processor(Projection("workflow-projector", (), None, flaky),
                              DeadLetters("workflow-projector", fresh_db.kafka_bootstrap or "",
                                          pool), RetryPolicy(attempts=1))
        await processor.process(records_of(world.events))
    await flaky.close()
    return victim, stream


async def test_dlq_list_show_retry_and_the_audit_trail(fresh_db: Settings) -> None:
    victim, stream = await park_one(fresh_db)
    listed = json.loads(ringiflow(fresh_db, "dlq", "list", "--json").stdout)
    assert [(r["aggregate_id"], r["parked_events"]) for r in listed["parked"]] == \
        [(str(victim), len(stream) - 1)]
    counted = {g["group"]: g for g in listed["dead_letters"]}["workflow-projector"]
    assert counted["records"] >= len(stream) - 1 and counted["parked"] >= len(stream) - 2
    shown = ringiflow(fresh_db, "dlq", "show", str(victim), "--group", "workflow-projector",
                      "--json")
    versions = [int(r["version"]) for r in json.loads(shown.stdout)]
    assert versions == [e.version for e in stream[1:]]
    exported = ringiflow(fresh_db, "dlq", "export", "--aggregate", str(victim))
    assert len(exported.stdout.splitlines()) == len(stream) - 1

    dry = ringiflow(fresh_db, "dlq", "retry", "--all", "--dry-run")
    assert dry.returncode == 0 and "would re-drive" in dry.stdout
    assert json.loads(ringiflow(fresh_db, "dlq", "list", "--json").stdout)["parked"]  # still

    retried = ringiflow(fresh_db, "dlq", "retry", str(victim), "--json")
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout)[0]["released"] is True
    assert json.loads(ringiflow(fresh_db, "dlq", "list", "--json").stdout)["parked"] == []
    import psycopg

    from infra.settings import libpq_url

    with psycopg.connect(libpq_url(fresh_db.database_url or "")) as conn:
        version = conn.execute("SELECT last_event_version FROM read_model.workflow_read_models "
                               "WHERE id = %s", (victim,)).fetchone()
        trail = conn.execute("SELECT action, outcome FROM streams.operator_actions").fetchall()
    assert version == (stream[-1].version,)
    assert trail == [("dlq.retry", "released")]


async def test_dlq_discard_needs_a_reason_and_is_recorded(fresh_db: Settings) -> None:
    victim, _ = await park_one(fresh_db)
    missing = ringiflow(fresh_db, "dlq", "discard", str(victim), "--group", "workflow-projector")
    assert missing.returncode == 2 and "--reason" in missing.stderr
    done = ringiflow(fresh_db, "dlq", "discard", str(victim), "--group", "workflow-projector",
                     "--reason", "bad import of 2026-11-23; re-entered by hand")
    assert done.returncode == 0, done.stderr
    assert json.loads(ringiflow(fresh_db, "dlq", "list", "--json").stdout)["parked"] == []
    again = ringiflow(fresh_db, "dlq", "discard", str(victim), "--group", "workflow-projector",
                      "--reason", "second time")
    assert again.returncode == 1
    import psycopg

    from infra.settings import libpq_url

    with psycopg.connect(libpq_url(fresh_db.database_url or "")) as conn:
        trail = conn.execute("SELECT action, outcome, reason FROM streams.operator_actions "
                             "ORDER BY id").fetchall()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute("DELETE FROM streams.operator_actions")
    assert trail[0] == ("dlq.discard", "released", "bad import of 2026-11-23; re-entered by hand")
    assert trail[1][:2] == ("dlq.discard", "not_parked")


def test_replay_from_the_events_table_then_verify_and_repair(fresh_db: Settings) -> None:
    import psycopg

    from infra.settings import libpq_url

    world = _world_in(fresh_db, workflows=8)
    tenant = str(world.tenant_id)
    dry = json.loads(ringiflow(fresh_db, "replay", "workflow-projector", "--tenant", tenant,
                               "--dry-run", "--json").stdout)
    assert dry["events"] == len(world.events)
    done = ringiflow(fresh_db, "replay", "workflow-projector", "--tenant", tenant)
    assert done.returncode == 0, done.stderr
    assert "ETA" in done.stderr  # progress for long runs
    assert ringiflow(fresh_db, "verify", "workflow-projector").returncode == 0

    workflows = [s for s in world.states.values() if hasattr(s, "current_step_id")]
    broken, lost = workflows[0].id, workflows[1].id
    with psycopg.connect(libpq_url(fresh_db.database_url or ""), autocommit=True) as conn:
        conn.execute("UPDATE read_model.workflow_read_models SET status = 'approved', "
                     "last_event_version = 999 WHERE id = %s", (broken,))
        conn.execute("DELETE FROM read_model.workflow_read_models WHERE id = %s", (lost,))
    found = ringiflow(fresh_db, "verify", "workflow-projector", "--json")
    assert found.returncode == 1
    diffs = json.loads(found.stdout)["differences"]
    assert {d["aggregate_id"] for d in diffs} == {str(broken), str(lost)}
    assert {"field": "status", "expected": workflows[0].status.value, "actual": "approved",
            "aggregate_id": str(broken)} in diffs
    repaired = ringiflow(fresh_db, "verify", "workflow-projector", "--repair", "--json")
    assert repaired.returncode == 0, repaired.stdout
    assert sorted(json.loads(repaired.stdout)["repaired"]) == sorted([str(broken), str(lost)])

    single = json.loads(ringiflow(fresh_db, "replay", "workflow-projector", "--aggregate",
                                  str(broken), "--json").stdout)
    assert single["aggregates"] == 1 and single["events"] == workflows[0].version


def test_verify_compares_history_steps_tasks_and_users_not_only_the_row(
    fresh_db: Settings,
) -> None:
    """A read model can match on its top row and still miss a history row (as a
    reconcile that dropped events once left it): verify must see every table."""
    import psycopg

    from infra.settings import libpq_url

    world = _world_in(fresh_db, workflows=6)
    assert ringiflow(fresh_db, "replay", "workflow-projector").returncode == 0
    assert ringiflow(fresh_db, "verify", "workflow-projector").returncode == 0
    workflows = [s for s in world.states.values() if hasattr(s, "current_step_id")]
    open_one = next(w for w in workflows if w.status.value == "in_progress")
    users = [s for s in world.states.values() if hasattr(s, "display_name")]
    gap = next(w for w in workflows if w.version >= 2).id
    stepless, taskless = workflows[1].id, open_one.id
    with psycopg.connect(libpq_url(fresh_db.database_url or ""), autocommit=True) as conn:
        conn.execute("DELETE FROM read_model.workflow_history WHERE workflow_id = %s "
                     "AND version = 2", (gap,))
        conn.execute("UPDATE read_model.workflow_steps SET status = 'approved' "
                     "WHERE workflow_id = %s", (stepless,))
        conn.execute("DELETE FROM read_model.my_tasks WHERE workflow_id = %s", (taskless,))
        conn.execute("UPDATE read_model.users SET version = version - 1 WHERE id = %s",
                     (users[0].id,))
    found = ringiflow(fresh_db, "verify", "workflow-projector", "--json")
    assert found.returncode == 1, found.stdout
    diffs = json.loads(found.stdout)["differences"]
    fields = {(d["aggregate_id"], d["field"]) for d in diffs}
    assert (str(gap), "history") in fields
    assert {"aggregate_id": str(gap), "field": "history", "expected": "v2 present",
            "actual": "missing"} in diffs
    assert (str(stepless), "steps") in fields
    assert (str(taskless), "my_tasks") in fields
    assert (str(users[0].id), "users.version") in fields
    repaired = ringiflow(fresh_db, "verify", "workflow-projector", "--repair", "--json")
    assert repaired.returncode == 0, repaired.stdout
    assert ringiflow(fresh_db, "verify", "workflow-projector").returncode == 0


async def test_search_rebuild_is_blue_green_with_no_failed_or_empty_query(
    fresh_db: Settings,
) -> None:
    from infra.clients import opensearch_client
    from tests.helpers import Person

    alias = f"t-{uuid4().hex[:10]}"
    world = _world_in(fresh_db)
    cli = functools.partial(ringiflow, fresh_db, RINGIFLOW_SEARCH_ALIAS=alias)

    assert cli("replay", "search-indexer", "--tenant", str(world.tenant_id)).returncode == 0
    plan = json.loads(cli("rebuild", "search-indexer", "--dry-run", "--json").stdout)
    assert (plan["live"], plan["target"]) == (f"{alias}-v1", f"{alias}-v2")

    reader = Person(world.tenant_id, "検索者")
    headers = {"Authorization": f"Bearer {reader.token(TEST_JWT_SECRET)}"}
    workflows = sum(1 for e in world.events if e.event_type == "WorkflowCreated")

    async def probe(client: httpx.AsyncClient) -> object:
        r = await client.get("/api/v1/queries/search", params={"q": "大阪", "limit": 100},
                             headers=headers)
        return r.status_code, body_of(r).get("total", -1)

    rebuilt, outcomes = await _under_load(
        fresh_db, probe, lambda: cli("rebuild", "search-indexer", "--json"),
        RINGIFLOW_SEARCH_ALIAS=alias)
    assert rebuilt.returncode == 0, rebuilt.stderr
    result = json.loads(rebuilt.stdout)
    assert result["swapped_from"] == f"{alias}-v1" and result["kept"] == [f"{alias}-v1"]
    assert len(outcomes) > 20
    assert set(outcomes) == {(200, workflows)}, "a query failed or saw an empty index"

    again = json.loads(cli("rebuild", "search-indexer", "--drop-old", "--json").stdout)
    assert again["target"] == f"{alias}-v3"
    assert sorted(again["dropped"]) == [f"{alias}-v1", f"{alias}-v2"]
    search = opensearch_client(fresh_db.opensearch_url or "")
    try:
        assert list(await search.indices.get_alias(name=alias)) == [f"{alias}-v3"]
    finally:
        await search.close()


def body_of(response: httpx.Response) -> dict:
    """The JSON body, or {} (a failing server may answer in plain text)."""
    try:
        return response.json()
    except ValueError:
        return {}


def _world_in(settings: Settings, workflows: int = 30) -> World:
    from tests.events import append

    world = build_world(workflows=workflows)
    for event in world.events:
        append(settings.database_url or "", [event])
    return world


async def _under_load(settings: Settings, probe: Callable[[httpx.AsyncClient], Awaitable[object]],
                      during: Callable[[], subprocess.CompletedProcess[str]],
                      **env: str) -> tuple[subprocess.CompletedProcess[str], list[object]]:
    """Run `during` (a CLI call) while a client keeps querying; every outcome."""
    from tests.conftest import component

    outcomes: list[object] = []
    with component("query-api", settings, "RINGIFLOW_QUERY_API_PORT", **env) as base:
        stop = asyncio.Event()

        async def load() -> None:
            async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                while not stop.is_set():
                    outcomes.append(await probe(client))

        loader = asyncio.create_task(load())
        await asyncio.sleep(0.5)
        finished = await asyncio.to_thread(during)
        await asyncio.sleep(0.5)
        stop.set()
        await loader
    return finished, outcomes


def _schemas(settings: Settings) -> list[str]:
    import psycopg

    from infra.settings import libpq_url

    with psycopg.connect(libpq_url(settings.database_url or "")) as conn:
        return [r[0] for r in conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'read\\_model\\_v%' "
            "ORDER BY 1")]


async def test_workflow_rebuild_is_blue_green_with_no_failed_or_empty_query(
    fresh_db: Settings,
) -> None:
    from tests.helpers import Person

    world = _world_in(fresh_db)
    tenant = str(world.tenant_id)
    workflows = sum(1 for e in world.events if e.event_type == "WorkflowCreated")
    assert ringiflow(fresh_db, "replay", "workflow-projector", "--tenant", tenant).returncode == 0
    plan = json.loads(ringiflow(fresh_db, "rebuild", "workflow-projector", "--dry-run",
                                "--json").stdout)
    assert (plan["live"], plan["target"], plan["resume"]) == ("read_model_v1", "read_model_v2",
                                                              False)
    assert plan["events"] == len(world.events) and plan["workflows"] == workflows
    assert _schemas(fresh_db) == ["read_model_v1"], "a dry run created something"

    reader = Person(world.tenant_id, "一覧者")
    headers = {"Authorization": f"Bearer {reader.token(TEST_JWT_SECRET)}"}

    async def probe(client: httpx.AsyncClient) -> object:
        r = await client.get("/api/v1/queries/workflows", params={"limit": 100},
                             headers=headers)
        return r.status_code, len(body_of(r).get("items", []))

    rebuilt, outcomes = await _under_load(
        fresh_db, probe, lambda: ringiflow(fresh_db, "rebuild", "workflow-projector"))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "read_model_v2 is live (was read_model_v1)" in rebuilt.stdout
    assert "events/s" in rebuilt.stderr and "ETA" in rebuilt.stderr
    assert len(outcomes) > 20
    assert set(outcomes) == {(200, workflows)}, "a query failed or saw an empty model"
    assert ringiflow(fresh_db, "verify", "workflow-projector").returncode == 0

    again = json.loads(ringiflow(fresh_db, "rebuild", "workflow-projector", "--drop-old",
                                 "--json").stdout)
    assert (again["swapped_from"], again["target"]) == ("read_model_v2", "read_model_v3")
    assert again["dropped"] == ["read_model_v1", "read_model_v2"]
    assert _schemas(fresh_db) == ["read_model_v3"]
    assert ringiflow(fresh_db, "verify", "workflow-projector").returncode == 0


async def test_an_interrupted_rebuild_resumes_where_it_stopped(fresh_db: Settings) -> None:
    from operations.rebuild import run_rebuild

    world = _world_in(fresh_db, workflows=20)

    class Crash(Exception):
        pass

    def crash_after_three_batches(message: str) -> None:
        if message.startswith("copy") and int(message.split("/")[0].split()[-1]
                                              .replace(",", "")) >= 30:
            raise Crash(message)

    with pytest.raises(Crash):
        await run_rebuild(fresh_db, "workflow-projector", progress=crash_after_three_batches,
                          batch=10)
    plan = json.loads(ringiflow(fresh_db, "rebuild", "workflow-projector", "--dry-run",
                                "--json").stdout)
    assert (plan["target"], plan["resume"]) == ("read_model_v2", True)
    assert 30 <= plan["events_done"] < len(world.events)
    resumed = json.loads(ringiflow(fresh_db, "rebuild", "workflow-projector", "--json").stdout)
    assert (resumed["target"], resumed["swapped_from"]) == ("read_model_v2", "read_model_v1")
    assert ringiflow(fresh_db, "verify", "workflow-projector").returncode == 0

    # Interrupted again, then abandoned: the half-built version goes, the live one stays.
    with pytest.raises(Crash):
        await run_rebuild(fresh_db, "workflow-projector", progress=crash_after_three_batches,
                          batch=10)
    assert _schemas(fresh_db) == ["read_model_v1", "read_model_v2", "read_model_v3"]
    nothing = ringiflow(fresh_db, "rebuild", "search-indexer", "--abandon")
    assert nothing.returncode == 2 and "nothing to abandon" in nothing.stderr
    abandoned = ringiflow(fresh_db, "rebuild", "workflow-projector", "--abandon")
    assert abandoned.returncode == 0, abandoned.stderr
    assert "abandoned read_model_v3; read_model_v2 stays live" in abandoned.stdout
    assert _schemas(fresh_db) == ["read_model_v1", "read_model_v2"]
    assert ringiflow(fresh_db, "verify", "workflow-projector").returncode == 0


def test_a_throttled_rebuild_keeps_to_its_rate(fresh_db: Settings) -> None:
    world = _world_in(fresh_db, workflows=10)
    started = time.monotonic()
    done = ringiflow(fresh_db, "rebuild", "workflow-projector", "--max-rate", "100",
                     "--batch-size", "20")
    assert done.returncode == 0, done.stderr
    # ~70 events at <= 100/s cannot take less than ~0.5 s of copying.
    assert time.monotonic() - started > len(world.events) / 100 * 0.8


async def test_cache_rebuild_switches_namespaces_with_no_failed_or_empty_query(
    fresh_db: Settings,
) -> None:
    import redis.asyncio as aioredis

    from projectors.cache.layout import NAMESPACE_KEY
    from tests.helpers import Person

    # A Redis database of its own: the namespace pointer is global to a database.
    settings = fresh_db.model_copy(update={
        "redis_url": (fresh_db.redis_url or "").rsplit("/", 1)[0] + "/7"})
    redis = aioredis.Redis.from_url(settings.redis_url or "")
    await redis.flushdb()
    try:
        world = _world_in(settings)
        tenant = world.tenant_id
        assert ringiflow(settings, "replay", "cache-projector", "--tenant",
                         str(tenant)).returncode == 0
        one = next(e.aggregate_id for e in world.events
                   if e.event_type == "WorkflowCreated")
        reader = Person(tenant, "閲覧者")
        headers = {"Authorization": f"Bearer {reader.token(TEST_JWT_SECRET)}"}

        async def probe(client: httpx.AsyncClient) -> object:
            stats = await client.get("/api/v1/queries/dashboard/stats", headers=headers)
            detail = await client.get(f"/api/v1/queries/workflows/{one}", headers=headers)
            body = body_of(stats)
            return (stats.status_code, body.get("source"), body.get("pending"),
                    detail.status_code, body_of(detail).get("source"))

        before = await redis.hget(f"stats:{tenant}", "pending")
        assert before is not None and int(before) > 0
        rebuilt, outcomes = await _under_load(
            settings, probe, lambda: ringiflow(settings, "rebuild", "cache-projector"),
            RINGIFLOW_REDIS_URL=settings.redis_url or "")
        assert rebuilt.returncode == 0, rebuilt.stderr
        assert "v2 is live (was v1)" in rebuilt.stdout
        assert await redis.get(NAMESPACE_KEY) == b"v2:"
        assert len(outcomes) > 20
        assert set(outcomes) == {(200, "cache", int(before), 200, "cache")}, \
            "a query failed, fell back, or saw empty counters"
        assert await redis.hget(f"v2:stats:{tenant}", "pending") == before

        again = json.loads(ringiflow(settings, "rebuild", "cache-projector", "--drop-old",
                                     "--json").stdout)
        assert (again["target"], again["dropped"]) == ("v3", ["v1", "v2"])
        assert [k async for k in redis.scan_iter(match="workflow:*")] == []
        assert [k async for k in redis.scan_iter(match="v2:*")] == []
        assert await redis.hget(f"v3:stats:{tenant}", "pending") == before
    finally:
        await redis.flushdb()
        await redis.aclose()


async def test_rebuild_while_commands_flow_through_the_live_projector(
    system: dict[str, str], isolated: Settings,
) -> None:
    """The live workflow-projector keeps writing through the views while the
    rebuild copies and cuts over; afterwards the new version has every event."""
    async with httpx.AsyncClient(base_url=system["commands"], timeout=30) as client:
        tenant = await Tenant(client, TEST_JWT_SECRET, isolated.database_url or "").setup()
        stop = asyncio.Event()
        created: list[UUID] = []

        async def write() -> None:
            while not stop.is_set():
                created.append((await tenant.submitted_workflow())[0])

        writer = asyncio.create_task(write())
        await asyncio.sleep(1)
        rebuilt = await asyncio.to_thread(ringiflow, isolated, "rebuild",
                                          "workflow-projector", "--batch-size", "5")
        await asyncio.sleep(1)
        stop.set()
        await writer
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert len(created) > 3
    deadline = time.monotonic() + 60
    while (verified := ringiflow(isolated, "verify", "workflow-projector")).returncode != 0:
        assert time.monotonic() < deadline, verified.stdout
        await asyncio.sleep(1)
    plan = json.loads(ringiflow(isolated, "rebuild", "workflow-projector", "--dry-run",
                                "--json").stdout)
    assert plan["live"] == "read_model_v2"


async def test_verify_finds_and_repairs_cache_and_search_differences(fresh_db: Settings) -> None:
    import redis.asyncio as aioredis

    from projectors.projection import Delivery
    from projectors.search.store import SearchStore

    alias = f"t-{uuid4().hex[:10]}"
    settings = fresh_db.model_copy(update={
        "redis_url": (fresh_db.redis_url or "").rsplit("/", 1)[0] + "/8", "search_alias": alias})
    cli = functools.partial(ringiflow, settings, RINGIFLOW_SEARCH_ALIAS=alias)

    redis = aioredis.Redis.from_url(settings.redis_url or "")
    await redis.flushdb()
    try:
        world = _world_in(settings, workflows=10)
        t = world.tenant_id
        in_progress = [s for s in world.states.values()
                       if getattr(s, "status", None) is not None
                       and s.status.value == "in_progress"]
        broken, lost = in_progress[0].id, in_progress[1].id
        assert cli("replay", "cache-projector", "--tenant", str(t)).returncode == 0
        assert cli("verify", "cache-projector").returncode == 0
        # The index misses one workflow entirely and the last event of another,
        # as if their events had been dead-lettered and discarded.
        last_of_broken = max((e for e in world.events if e.aggregate_id == broken),
                             key=lambda e: e.version)
        index = SearchStore(settings.opensearch_url or "", alias)
        await index.start()
        await index.apply([Delivery(e, replay=True) for e in world.events
                           if e.aggregate_type.value == "workflow"
                           and e.aggregate_id != lost and e is not last_of_broken])
        await index.close()

        await redis.hset(f"wfver:{t}", str(broken), 999)
        await redis.hset(f"wfstatus:{t}", str(broken), "approved")
        await redis.hdel(f"wfver:{t}", str(lost))
        await redis.hincrby(f"stats:{t}", "pending", 5)

        for projector, fields in (("cache-projector", {"version", "status", "cached",
                                                        "stats.pending"}),
                                  ("search-indexer", {"version", "document"})):
            found = cli("verify", projector, "--json")
            assert found.returncode == 1, found.stderr
            diffs = json.loads(found.stdout)["differences"]
            assert {d["aggregate_id"] for d in diffs} == {str(broken), str(lost)} | (
                {str(t)} if projector == "cache-projector" else set())
            assert {d["field"] for d in diffs} >= fields
            repaired = cli("verify", projector, "--repair", "--json")
            assert repaired.returncode == 0, repaired.stdout + repaired.stderr
            assert sorted(json.loads(repaired.stdout)["repaired"]) == sorted([str(broken),
                                                                               str(lost)])
            assert cli("verify", projector).returncode == 0
        pending = sum(1 for s in world.states.values()
                      if getattr(s, "status", None) is not None
                      and s.status.value == "in_progress")
        assert int(await redis.hget(f"stats:{t}", "pending")) == pending
    finally:
        await redis.flushdb()
        await redis.aclose()


def test_a_rebuild_killed_mid_copy_resumes_and_goes_live(fresh_db: Settings) -> None:
    import signal

    world = _world_in(fresh_db, workflows=10)
    running = subprocess.Popen(
        [sys.executable, "-m", "ringiflow", "rebuild", "workflow-projector", "--max-rate", "40",
         "--batch-size", "5"], env=settings_env(fresh_db), stderr=subprocess.PIPE, text=True)
    assert running.stderr is not None
    for line in running.stderr:  # throttled: the copy takes seconds; kill it inside
        if line.startswith("· copy: ") and int(line.split()[2].split("/")[0]) >= 15:
            break
    running.send_signal(signal.SIGKILL)
    running.wait(10)
    plan = json.loads(ringiflow(fresh_db, "rebuild", "workflow-projector", "--dry-run",
                                "--json").stdout)
    assert plan["resume"] and plan["target"] == "read_model_v2"
    assert 15 <= plan["events_done"] < len(world.events)
    resumed = json.loads(ringiflow(fresh_db, "rebuild", "workflow-projector", "--json").stdout)
    assert (resumed["swapped_from"], resumed["target"]) == ("read_model_v1", "read_model_v2")
    assert resumed["events_done"] >= len(world.events)
    assert ringiflow(fresh_db, "verify", "workflow-projector").returncode == 0


def test_a_failing_or_concurrent_rebuild_says_why_and_leaves_the_live_version(
    fresh_db: Settings,
) -> None:
    import psycopg

    from infra.settings import libpq_url

    world = _world_in(fresh_db, workflows=4)
    url = libpq_url(fresh_db.database_url or "")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext('ringiflow.rebuild:workflow-projector'))")
        busy = ringiflow(fresh_db, "rebuild", "workflow-projector")
        assert busy.returncode == 1
        assert "another `ringiflow rebuild workflow-projector` is running" in busy.stderr
    with psycopg.connect(url, autocommit=True) as conn:
        # An event this code cannot decode (say, written by a newer release).
        conn.execute(
            "INSERT INTO event_store.events (event_id, tenant_id, aggregate_type, aggregate_id, "
            "version, event_type, schema_version, occurred_at, payload, aggregate, metadata) "
            "SELECT gen_random_uuid(), tenant_id, aggregate_type, aggregate_id, version + 100, "
            "'WorkflowTeleported', 1, occurred_at, payload, aggregate, metadata "
            "FROM event_store.events WHERE aggregate_type = 'workflow' LIMIT 1")
    failed = ringiflow(fresh_db, "rebuild", "workflow-projector")
    assert failed.returncode == 1, failed.stderr
    assert "the copy pass stopped after position" in failed.stderr
    assert "WorkflowTeleported" in failed.stderr and "resumes" in failed.stderr
    plan = json.loads(ringiflow(fresh_db, "rebuild", "workflow-projector", "--dry-run",
                                "--json").stdout)
    assert (plan["live"], plan["resume"]) == ("read_model_v1", True)
    assert plan["events"] == len(world.events) + 1


async def test_rebuild_reads_events_whose_transaction_committed_late_or_around_the_cut_over(
    fresh_db: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two races the passes exist for: (1) an event whose transaction commits
    after a higher position was read (positions are taken at insert, not at commit);
    (2) an event the live projector applies to the old version just before the
    cut-over. Both must be in the new version."""
    import psycopg

    from infra.settings import libpq_url
    from operations.rebuild import run_rebuild
    from projectors.projection import Delivery
    from projectors.workflows.store import WorkflowStore
    from projectors.workflows.versions import TableVersions
    from tests.events import append, append_on

    world = build_world(workflows=6)
    workflows = [e.aggregate_id for e in world.events if e.event_type == "WorkflowCreated"]
    last = {wid: max((e for e in world.events if e.aggregate_id == wid),
                     key=lambda e: e.version) for wid in workflows[:3]}
    late, neighbour, at_cut_over = (last[w] for w in workflows[:3])
    held_back = {late.event_id, neighbour.event_id, at_cut_over.event_id}
    url = libpq_url(fresh_db.database_url or "")
    append(fresh_db.database_url or "", [e for e in world.events if e.event_id not in held_back])

    slow = psycopg.connect(url)  # inserts first (lower position), commits last
    append_on(slow, [late])
    append(fresh_db.database_url or "", [neighbour])

    def commit_the_slow_one(message: str) -> None:
        if message.startswith("copy") and not slow.closed:
            slow.commit()
            slow.close()

    original = TableVersions.cut_over

    async def live_projector_writes_first(self: TableVersions, target: str,
                                          live: str | None) -> None:
        append(fresh_db.database_url or "", [at_cut_over])
        store = WorkflowStore(url)  # the live projector: through the views, old version
        await store.start()
        await store.apply([Delivery(at_cut_over)])
        await store.close()
        await original(self, target, live)

    monkeypatch.setattr(TableVersions, "cut_over", live_projector_writes_first)
    result = await run_rebuild(fresh_db, "workflow-projector", progress=commit_the_slow_one)
    assert (result.swapped_from, result.target) == ("read_model_v1", "read_model_v2")
    with psycopg.connect(url) as conn:
        versions = dict(conn.execute(
            "SELECT id, last_event_version FROM read_model_v2.workflow_read_models "
            "WHERE id = ANY(%s)", ([late.aggregate_id, neighbour.aggregate_id,
                                   at_cut_over.aggregate_id],)).fetchall())
    assert versions == {late.aggregate_id: late.version,
                        neighbour.aggregate_id: neighbour.version,
                        at_cut_over.aggregate_id: at_cut_over.version}


async def test_a_rebuild_that_fails_after_its_cut_over_finishes_on_the_next_run(
    fresh_db: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import operations.rebuild as rebuild_module
    from projectors.projection import Retryable

    _world_in(fresh_db, workflows=4)
    original = rebuild_module._pass

    async def fails_after_the_switch(*args: object, **kwargs: object) -> int:
        if kwargs["label"] == "after cut-over":
            raise Retryable("PostgreSQL deadlock detected (40P01)")
        return await original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(rebuild_module, "_pass", fails_after_the_switch)
    with pytest.raises(rebuild_module.RebuildFailed, match="after cut-over pass stopped"):
        await rebuild_module.run_rebuild(fresh_db, "workflow-projector")
    monkeypatch.undo()
    plan = json.loads(ringiflow(fresh_db, "rebuild", "workflow-projector", "--dry-run",
                                "--json").stdout)
    assert (plan["target"], plan["resume"]) == ("read_model_v2", True)
    refused = ringiflow(fresh_db, "rebuild", "workflow-projector", "--abandon")
    assert refused.returncode == 2 and "already live" in refused.stderr
    assert _schemas(fresh_db) == ["read_model_v1", "read_model_v2"]
    finished = json.loads(ringiflow(fresh_db, "rebuild", "workflow-projector", "--json").stdout)
    assert (finished["target"], finished["swapped_from"]) == ("read_model_v2", "read_model_v1")
    assert finished["kept"] == ["read_model_v1"]
    assert ringiflow(fresh_db, "verify", "workflow-projector").returncode == 0


async def test_dlq_list_counts_dead_letters_that_hold_back_no_aggregate(
        fresh_db: Settings) -> None:
    """A poison record names no aggregate, so nothing is parked: `dlq list` must still
    show it (it used to say only "no parked aggregates")."""
    from psycopg_pool import AsyncConnectionPool

    from infra.settings import libpq_url
    from projectors.projection import Projection
    from streams.deadletters import DeadLetters, Record
    from streams.processor import Processor

    group = "audit-processor"
    poison = Record("ringiflow.workflow.events", 0, 0, b"k", b"\xff not an event", ())
    async with AsyncConnectionPool(libpq_url(fresh_db.role_database_url("projector")),
                                   min_size=1, max_size=2) as pool:
        processor = Processor(Projection(group, (), None, None),  # type: ignore[arg-type]
                              DeadLetters(group, fresh_db.kafka_bootstrap or "", pool))
        await processor.process([poison])

    listed = json.loads(ringiflow(fresh_db, "dlq", "list", "--group", group, "--json").stdout)
    assert listed["parked"] == []
    [counted] = listed["dead_letters"]
    assert counted["group"] == group and counted["without_aggregate"] >= 1
    assert counted["error_classes"].get("UndecodableRecord", 0) >= 1
    text = ringiflow(fresh_db, "dlq", "list", "--group", group).stdout
    assert "of no aggregate" in text and "UndecodableRecord" in text
    assert "no parked aggregates" in text

"""One contract for every projection store: each event delivered one to three
times, in shuffled batches with older versions arriving after newer ones, then a
full replay, ends in exactly the state that delivering the history once, in
order, produces; and that state says what the events say."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import orjson
import psycopg
import pytest

from commands import domain
from infra.clients import opensearch_client, redis_client
from infra.settings import Settings, libpq_url
from projectors.cache.store import CacheStore
from projectors.projection import Delivery, NonRetryable, Store
from projectors.search.store import ALIAS, SearchStore
from projectors.workflows.store import WorkflowStore
from tests.scenarios import World, build_world, chaotic, in_order

State = dict[str, Any]


@dataclass
class Adapter:
    name: str
    make: Callable[[Settings], Store]
    read: Callable[[Settings, UUID], Awaitable[State]]
    check: Callable[[State, World], None]
    volatile: frozenset[str] = frozenset()  # cache parts that may differ by arrival order


# --- PostgreSQL: workflow-projector ---------------------------------------------------

PG_TABLES = {
    "workflows": "SELECT id, definition_name, title, status, priority, current_step_name, "
                 "current_assignee_id, current_assignee_name, initiated_by_name, due_date, "
                 "completed_at, last_event_version FROM read_model.workflow_read_models "
                 "WHERE tenant_id = %s ORDER BY id",
    "steps": "SELECT workflow_id, step_order, name, assignee_id, assignee_name, status, "
             "decided_at, comment FROM read_model.workflow_steps WHERE tenant_id = %s "
             "ORDER BY workflow_id, step_order",
    "tasks": "SELECT workflow_id, step_id, assignee_id, assignee_name, workflow_title, "
             "step_name, priority FROM read_model.my_tasks WHERE tenant_id = %s "
             "ORDER BY workflow_id, step_id",
    "history": "SELECT event_id, workflow_id, version, event_type, actor_id FROM "
               "read_model.workflow_history WHERE tenant_id = %s ORDER BY workflow_id, version",
    "users": "SELECT id, display_name, version FROM read_model.users WHERE tenant_id = %s "
             "ORDER BY id",
    "definitions": "SELECT id, name, version FROM read_model.definitions WHERE tenant_id = %s",
}


async def read_postgres(settings: Settings, tenant: UUID) -> State:
    async with await psycopg.AsyncConnection.connect(libpq_url(settings.database_url or "")
                                                     ) as conn:
        state = {}
        for name, query in PG_TABLES.items():
            cur = await conn.execute(query, (tenant,))
            state[name] = await cur.fetchall()
        return state


def workflows_of(world: World) -> dict[UUID, domain.WorkflowState]:
    return {s.id: s for s in world.states.values() if isinstance(s, domain.WorkflowState)}


def check_postgres(state: State, world: World) -> None:
    workflows = {row[0]: row for row in state["workflows"]}
    finals = workflows_of(world)
    assert set(workflows) == set(finals)
    for workflow_id, final in finals.items():
        row = workflows[workflow_id]
        assert (row[3], row[11]) == (final.status.value, final.version)
    renamed = {s.id: s.display_name for s in world.states.values()
               if isinstance(s, domain.UserState)}
    for row in state["workflows"]:
        assert row[8] in renamed.values()  # initiator's current name, after the rename
        if row[6] is not None:
            assert row[7] == renamed[row[6]]
    assert "申請 花子" in {r[8] for r in state["workflows"]}
    for _, _, _, assignee, name, *_ in state["steps"]:
        assert name == renamed[assignee]
    pending = {(s.id, st.step_id) for s in finals.values() if s.status.value == "in_progress"
               for st in s.steps if st.status.value == "pending"}
    assert {(r[0], r[1]) for r in state["tasks"]} == pending
    workflow_events = [e for e in world.events if e.aggregate_type.value == "workflow"]
    assert len(state["history"]) == len(workflow_events)


# --- Redis: cache-projector --------------------------------------------------------------


async def read_redis(settings: Settings, tenant: UUID) -> State:
    client = redis_client(settings.redis_url or "")
    try:
        versions = {k.decode(): int(v) for k, v in
                    (await client.hgetall(f"wfver:{tenant}")).items()}
        details = {}
        for workflow_id in versions:
            body = await client.get(f"workflow:{tenant}:{workflow_id}")
            if body:
                snapshot = orjson.loads(body)
                names = {snapshot["initiator_name"], snapshot["current_assignee_name"]}
                details[workflow_id] = (snapshot["version"], snapshot["status"], names)
        completed = {}
        async for key in client.scan_iter(match=f"stats:{tenant}:completed:*"):
            completed[key.decode().rsplit(":", 1)[1]] = int(await client.get(key) or 0)
        overdue = await client.zrange(f"overdue:{tenant}", 0, -1, withscores=True)
        return {
            "versions": sorted((UUID(k), v) for k, v in versions.items()),
            "details": sorted((UUID(k), v) for k, v in details.items()),
            "pending": [(int(await client.hget(f"stats:{tenant}", "pending") or 0),)],
            "completed": sorted(completed.items()),
            "overdue": sorted((UUID(m.decode()), score) for m, score in overdue),
        }
    finally:
        await client.aclose()


def check_redis(state: State, world: World) -> None:
    finals = workflows_of(world)
    assert dict(state["versions"]) == {i: s.version for i, s in finals.items()}
    # A cache: an entry may be missing, but one that exists is current, names included.
    current_names = {s.display_name for s in world.states.values()
                     if isinstance(s, domain.UserState)} | {None}
    for workflow_id, (version, status, names) in state["details"]:
        final = finals[workflow_id]
        assert (version, status) == (final.version, final.status.value)
        assert names <= current_names, names
    in_progress = [s for s in finals.values() if s.status.value == "in_progress"]
    assert state["pending"] == [(len(in_progress),)]
    completed = Counter(s.completed_at.date().isoformat() for s in finals.values()
                        if s.status.value in ("approved", "rejected") and s.completed_at)
    assert dict(state["completed"]) == dict(completed)
    assert {m for m, _ in state["overdue"]} == {s.id for s in in_progress if s.due_date}


# --- OpenSearch: search-indexer ------------------------------------------------------------


async def read_search(settings: Settings, tenant: UUID) -> State:
    client = opensearch_client(settings.opensearch_url or "")
    try:
        await client.indices.refresh(index=ALIAS)
        found = await client.search(index=ALIAS, body={
            "query": {"term": {"tenant_id": str(tenant)}}, "size": 1000, "version": True})
        docs = [(UUID(h["_id"]), h["_version"], h["_source"]["status"], h["_source"]["title"])
                for h in found["hits"]["hits"]]
        matches = await client.search(index=ALIAS, body={"query": {"bool": {
            "filter": [{"term": {"tenant_id": str(tenant)}}],
            "must": [{"match": {"title": "大阪"}}]}}, "size": 1000})
        return {"docs": sorted(docs), "japanese_matches": [(matches["hits"]["total"]["value"],)]}
    finally:
        await client.close()


def check_search(state: State, world: World) -> None:
    finals = workflows_of(world)
    assert {d[0]: (d[1], d[2]) for d in state["docs"]} == {
        i: (s.version, s.status.value) for i, s in finals.items()}
    assert state["japanese_matches"] == [(len(finals),)]  # every title mentions 大阪


ADAPTERS = [
    Adapter("postgres", lambda s: WorkflowStore(libpq_url(s.role_database_url("projector"))),
            read_postgres, check_postgres),
    Adapter("redis", lambda s: CacheStore(s.redis_url or ""), read_redis, check_redis,
            frozenset({"details"})),
    Adapter("opensearch", lambda s: SearchStore(s.opensearch_url or ""), read_search,
            check_search),
]


@pytest.fixture(params=ADAPTERS, ids=lambda a: a.name)
async def adapter(request: pytest.FixtureRequest) -> AsyncIterator[Adapter]:
    yield request.param


async def project(adapter: Adapter, settings: Settings, batches: list) -> None:
    store = adapter.make(settings)
    await store.start()
    try:
        for batch in batches:
            await store.apply(batch)
    finally:
        await store.close()


async def test_duplicates_reordering_and_replays_never_change_the_final_state(
    adapter: Adapter, settings: Settings,
) -> None:
    ordered = build_world(seed=11)
    await project(adapter, settings, in_order(ordered.events))
    expected = await adapter.read(settings, ordered.tenant_id)
    adapter.check(expected, ordered)

    # The same history (another tenant's copy), delivered badly.
    shadow = build_world(seed=11)
    await project(adapter, settings, chaotic(shadow.events))
    actual = await adapter.read(settings, shadow.tenant_id)
    adapter.check(actual, shadow)
    comparable = {k for k in expected if k not in adapter.volatile}
    assert {k: v for k, v in normalise(actual, shadow).items() if k in comparable} == \
        {k: v for k, v in normalise(expected, ordered).items() if k in comparable}


def normalise(state: State, world: World) -> State:
    """Ids differ between two generated worlds; positions and values must not."""
    order = {aggregate: n for n, aggregate in enumerate(dict.fromkeys(
        e.aggregate_id for e in world.events))}
    steps = {st.step_id: (order[s.id], st.order) for s in workflows_of(world).values()
             for st in s.steps}
    events = {e.event_id: (order[e.aggregate_id], e.version) for e in world.events}

    def plain(value: Any) -> Any:
        if isinstance(value, UUID):
            for table in (order, steps, events):
                if value in table:
                    return table[value]
        return value

    return {name: sorted((tuple(plain(v) for v in row) for row in rows), key=repr)
            for name, rows in state.items()}


async def test_a_row_postgresql_refuses_is_the_events_fault_and_writes_nothing(
    settings: Settings,
) -> None:
    """The workflow store pipelines its statements (two round trips per tenant). A row
    the database refuses must still surface as that batch's own error, NonRetryable
    (dead-lettered), not as an aborted pipeline read as an outage and retried
    forever; nothing of the batch is written, and the store goes on."""
    world = build_world(workflows=2, seed=5)
    events = list(world.events)
    n = next(i for i, e in enumerate(events) if e.aggregate_type.value == "workflow")
    too_long = {**events[n].aggregate, "title": "長" * 501}  # the column holds 500
    broken = [*events[:n], events[n].model_copy(update={"aggregate": too_long}), *events[n + 1:]]
    store = WorkflowStore(libpq_url(settings.role_database_url("projector")))
    await store.start()
    try:
        with pytest.raises(NonRetryable, match=r"StringDataRightTruncation"):
            await store.apply([Delivery(e) for e in broken])
        assert all(rows == [] for rows in (await read_postgres(settings, world.tenant_id))
                   .values())
        for batch in in_order(world.events):
            await store.apply(batch)
    finally:
        await store.close()
    check_postgres(await read_postgres(settings, world.tenant_id), world)

"""One contract for every read model's versioned operations (projectors.versioned), run
against each real server: a new version is built beside the live one, counted, cut over
to and verified clean; the old one dropped; a copy that goes wrong is found by verify,
forgotten and replayed clean again, with the cache's counters recounted true.

Each test gets a read model of its own: a fresh database (its read_model views), a Redis
database of its own (its namespace pointer) and an alias of its own."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from uuid import uuid4

import pytest

from infra.settings import Settings
from operations.scope import Scope, newest_snapshots
from projectors.cache.versions import CacheVersions
from projectors.projection import Delivery
from projectors.search.versions import SearchVersions
from projectors.versioned import VersionedStore
from projectors.workflows.versions import TableVersions
from tests.events import append
from tests.scenarios import World, build_world, in_order

VERSIONED = [TableVersions, CacheVersions, SearchVersions]


@pytest.fixture(params=VERSIONED, ids=lambda v: v.projector)
async def versions(request: pytest.FixtureRequest,
                   fresh_db: Settings) -> AsyncIterator[VersionedStore]:
    own = fresh_db.model_copy(update={
        "redis_url": (fresh_db.redis_url or "").rsplit("/", 1)[0] + f"/{random.randint(2, 15)}",
        "search_alias": f"versioned-{uuid4().hex[:8]}"})
    store = request.param(own)
    if isinstance(store, CacheVersions):
        await store.client.flushdb()
    yield store
    if isinstance(store, CacheVersions):
        await store.client.flushdb()
    await store.close()


def history(versions: VersionedStore) -> World:
    world = build_world(workflows=12, seed=5)
    append(versions.settings.require("database_url"), world.events)  # the events table
    return world


async def fill(versions: VersionedStore, target: str, world: World) -> None:
    store = versions.store(target)
    await store.start()
    try:
        for batch in in_order(world.events):
            await store.apply([Delivery(d.envelope, replay=True) for d in batch])
    finally:
        await store.close()


def workflows(world: World) -> int:
    return sum(1 for e in world.events if e.aggregate_type.value == "workflow"
               and e.version == 1)


async def test_a_version_is_built_beside_the_live_one_counted_cut_over_and_dropped(
        versions: VersionedStore) -> None:
    world = history(versions)
    newest = newest_snapshots(versions.settings, Scope(world.tenant_id))
    live = await versions.live()
    target = versions.next_version([*await versions.existing(), *([live] if live else [])])
    assert target not in (live, *await versions.existing())

    await versions.create(target, live)
    await fill(versions, target, world)
    assert await versions.count(target) == workflows(world)
    if live is not None:  # the live version never saw this history: verify says so
        assert await versions.verify(newest, world.tenant_id)

    await versions.cut_over(target, live)
    assert await versions.live() == target
    assert await versions.verify(newest, world.tenant_id) == []
    if live is not None and live != target:
        await versions.drop(live)
        assert live not in await versions.existing() or isinstance(versions, CacheVersions)
        assert await versions.verify(newest, world.tenant_id) == []  # the live one stays


async def test_verify_finds_a_wrong_copy_and_forget_then_replay_repairs_it(
        versions: VersionedStore) -> None:
    world = history(versions)
    newest = newest_snapshots(versions.settings, Scope(world.tenant_id))
    live = await versions.live()
    target = live or versions.next_version(await versions.existing())
    if live is None:
        await versions.create(target, None)
        await versions.cut_over(target, None)
    # The live copy misses every event of one workflow after its first.
    victim = next(e.aggregate_id for e in world.events
                  if e.aggregate_type.value == "workflow" and e.version > 3)
    partial = World(world.tenant_id, [e for e in world.events
                                      if e.aggregate_id != victim or e.version == 1])
    await fill(versions, target, partial)
    differences = await versions.verify(newest, world.tenant_id)
    assert differences and {d.aggregate_id for d in differences
                            if not d.field.startswith("stats.")} == {victim}

    by_tenant = {world.tenant_id: [victim]}
    await versions.forget(by_tenant, newest)
    await fill(versions, target, World(world.tenant_id,
                                       [e for e in world.events if e.aggregate_id == victim]))
    await versions.recount(differences, newest, world.tenant_id)
    assert await versions.verify(newest, world.tenant_id) == []

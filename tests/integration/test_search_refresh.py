"""The live search indexer makes what it indexed searchable in the background and
only then announces it (projectors.search.store.Refresher): every applied version is
announced, each announcement is already found by a search, and bulks that finish
while a refresh is running share the next one instead of refreshing once each."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from uuid import uuid4

from opensearchpy import AsyncOpenSearch
from prometheus_client import REGISTRY

from contract import Applied, EventEnvelope
from infra.settings import Settings
from projectors.projection import Announcer, Delivery
from projectors.search.store import SearchStore
from tests.scenarios import build_world


class Checking(Announcer):
    """Records each announcement after checking that a search already finds it."""

    def __init__(self, client: AsyncOpenSearch, alias: str) -> None:
        super().__init__("postgresql://unused", "search")
        self.client, self.alias = client, alias
        self.calls: list[list[Applied]] = []

    async def __call__(self, applied: Sequence[Applied]) -> None:
        for _tenant, aggregate, version in applied:
            doc = await self.client.get(index=self.alias, id=str(aggregate),
                                        params={"realtime": "false"})
            assert doc["_version"] >= version, "announced before it was searchable"
        self.calls.append(list(applied))


@asynccontextmanager
async def live_indexer(settings: Settings, refresh_interval_s: float = 0.0,
                       ) -> AsyncIterator[tuple[SearchStore, Checking]]:
    """A live indexer on an index of its own, and the announcer that checks it; the
    index is deleted afterwards."""
    url = settings.require("opensearch_url")
    alias = f"refresh-test-{uuid4().hex[:8]}"
    reader = AsyncOpenSearch(hosts=[url])
    announcer = Checking(reader, alias)
    store = SearchStore(url, alias, announcer=announcer, refresh_interval_s=refresh_interval_s)
    await store.start()
    try:
        yield store, announcer
    finally:
        await store.close()
        await reader.indices.delete(index=f"{alias}-v1")
        await reader.close()


def workflow_events(workflows: int) -> list[EventEnvelope]:
    return [e for e in build_world(workflows=workflows).events
            if e.aggregate_type.value == "workflow"]


def newest(events: Sequence[EventEnvelope]) -> dict[tuple[object, object], int]:
    return {(e.tenant_id, e.aggregate_id): e.version for e in events}


def newest_announced(announcer: Checking) -> dict[tuple[object, object], int]:
    announced = sorted((x for call in announcer.calls for x in call), key=lambda x: x[2])
    return {(t, a): v for t, a, v in announced}


async def test_bulks_are_announced_once_searchable_and_share_refreshes(
        settings: Settings) -> None:
    async with live_indexer(settings) as (store, announcer):
        refreshes = 0
        refresh = store.client.indices.refresh

        async def counting(**kwargs: object) -> object:
            nonlocal refreshes
            refreshes += 1
            if refreshes == 1:  # a slow refresh: the bulks meanwhile must wait for one more
                await asyncio.sleep(0.5)
            return await refresh(**kwargs)

        store.client.indices.refresh = counting  # type: ignore[method-assign]
        delay = "ringiflow_search_refresh_delay_seconds"
        count_before = REGISTRY.get_sample_value(f"{delay}_count") or 0.0
        sum_before = REGISTRY.get_sample_value(f"{delay}_sum") or 0.0
        workflows = workflow_events(20)
        batches = [workflows[i:i + 5] for i in range(0, len(workflows), 5)]
        for batch in batches:  # as fast as the agent can: no waiting for visibility
            await store.apply([Delivery(e) for e in batch])
        assert store.refresher is not None
        await store.refresher.close()  # settles: everything indexed is announced
        assert newest_announced(announcer) == newest(workflows)
        assert refreshes <= 3 < len(batches), "bulks made during a refresh share the next one"
        # Each announced document's wait for its refresh is on the indexer's /metrics,
        # the slow first refresh's 0.5 s included.
        count = (REGISTRY.get_sample_value(f"{delay}_count") or 0.0) - count_before
        assert count == sum(len(call) for call in announcer.calls)
        assert (REGISTRY.get_sample_value(f"{delay}_sum") or 0.0) - sum_before >= 0.5


async def test_refreshes_start_at_most_once_per_interval_and_at_once_after_idle(
        settings: Settings) -> None:
    """RINGIFLOW_SEARCH_REFRESH_INTERVAL_MS: a steady trickle of bulks shares one
    refresh per interval (each writes a segment, whatever it holds), while the first
    bulk after a quiet spell is refreshed without waiting."""
    interval = 0.3
    async with live_indexer(settings, refresh_interval_s=interval) as (store, announcer):
        loop = asyncio.get_running_loop()
        started: list[float] = []
        refreshed = asyncio.Event()
        refresh = store.client.indices.refresh

        async def timed(**kwargs: object) -> object:
            started.append(loop.time())
            refreshed.set()
            return await refresh(**kwargs)

        store.client.indices.refresh = timed  # type: ignore[method-assign]
        workflows = workflow_events(10)[:40]
        first_bulk = loop.time()
        for event in workflows:  # one bulk every ~50 ms, for ~6 intervals
            await store.apply([Delivery(event)])
            await asyncio.sleep(0.05)
        assert started[0] - first_bulk < interval / 2, "the first refresh after idle waited"
        gaps = [b - a for a, b in itertools.pairwise(started)]
        assert len(started) >= 3 and min(gaps) >= interval * 0.95, gaps
        assert len(started) < len(workflows) / 3, "bulks in one interval share its refresh"
        # Quiet for longer than the interval: the next bulk is refreshed at once.
        await asyncio.sleep(interval * 2)
        refreshed.clear()
        again = loop.time()
        await store.apply([Delivery(workflows[0])])
        await asyncio.wait_for(refreshed.wait(), interval * 2)
        assert started[-1] - again < interval / 2, "a refresh after a quiet spell waited"
        assert store.refresher is not None
        await store.refresher.close()
        assert newest_announced(announcer) == newest(workflows)


async def test_a_slow_refresh_is_followed_by_a_pause_as_long_as_it_took(
        settings: Settings) -> None:
    """Where refreshes are costly (a loaded OpenSearch), a busy indexer spends at most
    half its time refreshing; where they are cheap, that spacing costs nothing."""
    async with live_indexer(settings) as (store, _announcer):
        loop = asyncio.get_running_loop()
        spans: list[tuple[float, float]] = []
        refresh = store.client.indices.refresh
        slow = 0.2

        async def slowed(**kwargs: object) -> object:
            began = loop.time()
            await asyncio.sleep(slow)  # as a refresh on a loaded server takes
            answer = await refresh(**kwargs)
            spans.append((began, loop.time()))
            return answer

        store.client.indices.refresh = slowed  # type: ignore[method-assign]
        for event in workflow_events(10)[:30]:  # one bulk every ~50 ms, for ~1.5 s
            await store.apply([Delivery(event)])
            await asyncio.sleep(0.05)
        assert store.refresher is not None
        closing = loop.time()
        await store.refresher.close()  # which refreshes at once: not a busy indexer's
        busy = [span for span in spans if span[0] < closing]
        pauses = [began - ended for (_b, ended), (began, _e) in itertools.pairwise(busy)]
        assert len(busy) >= 3, spans
        assert min(pauses) >= slow * 0.95, pauses

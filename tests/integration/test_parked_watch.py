"""A worker keeps its group's parked set between batches while it LISTENs for changes
(streams.deadletters.DeadLetters.watch, migration 0015): batches share one read, a
change made by any other process (a re-drive, an operator's SQL) is seen by the next
batch after its NOTIFY, what this process parks is seen by its very next batch, and
without a standing LISTEN every batch reads, as before."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial
from uuid import UUID, uuid4

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

import streams.deadletters as deadletters
from contract import dlq_topic
from infra.kafka import ensure_topics
from infra.settings import Settings, libpq_url
from projectors.projection import Projection
from projectors.workflows.store import WorkflowStore
from streams.deadletters import DeadLetters
from streams.processor import Processor
from streams.wrappers import RetryPolicy
from tests import helpers
from tests.integration.test_streams import Flaky, group_name, records_of, workflow_rows
from tests.scenarios import build_world


@pytest.fixture
async def pool(fresh_db: Settings) -> AsyncIterator[AsyncConnectionPool]:
    async with AsyncConnectionPool(libpq_url(fresh_db.role_database_url("projector")),
                                   min_size=1, max_size=2) as pool:
        yield pool


async def park(url: str, group: str, stream: tuple[UUID, UUID], event: UUID) -> None:
    """As another process would (a worker elsewhere, an operator): its own session."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO streams.parked_aggregates (consumer_group, aggregate_id, tenant_id,"
            " aggregate_type, first_event_id, first_version, last_version, error_class,"
            " error_message) VALUES (%s, %s, %s, 'workflow', %s, 2, 2, 'E', 'm')",
            (group, stream[1], stream[0], event))


async def release(url: str, group: str) -> None:
    """As `ringiflow dlq redrive` does once the parked events applied."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("DELETE FROM streams.parked_aggregates WHERE consumer_group = %s",
                           (group,))


# Changes are heard within milliseconds: poll often, give up soon.
eventually = partial(helpers.eventually, within_s=3.0, every_s=0.01)


async def test_batches_share_one_read_and_see_every_change_another_process_makes(
        fresh_db: Settings, pool: AsyncConnectionPool) -> None:
    url, group = libpq_url(fresh_db.role_database_url("projector")), group_name()
    dead = DeadLetters(group, fresh_db.kafka_bootstrap or "", pool)
    watching = asyncio.create_task(dead.watch(url))
    stream, event = (uuid4(), uuid4()), uuid4()
    try:
        await eventually(lambda: asyncio.sleep(0, dead.listening))
        assert await dead.parked({stream}) == {}
        for _ in range(20):  # twenty batches, nothing changed: one read
            assert await dead.parked({stream, (uuid4(), uuid4())}) == {}
        assert dead.reads == 1

        await park(url, group, stream, event)
        await eventually(lambda: dead.parked({stream}), within_s=3.0)
        assert await dead.parked({stream}) == {stream: event}
        assert dead.reads == 2, "one more read, after the change was heard"

        await release(url, group)
        await eventually(lambda: _none(dead.parked({stream})))
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
    assert not dead.listening


async def _none(pending: object) -> bool:
    return not await pending  # type: ignore[misc]


async def test_what_this_process_parks_is_seen_by_its_very_next_batch(
        fresh_db: Settings, pool: AsyncConnectionPool) -> None:
    """The NOTIFY of its own parking may come later than the next batch: the set is
    dropped as soon as the parking commits. Here no NOTIFY is ever heard (a LISTEN
    that stands but has not delivered yet), so only that drop keeps the order."""
    world = build_world(workflows=3)
    workflows = [e for e in world.events if e.aggregate_type.value == "workflow"]
    victim = workflows[-1].aggregate_id
    stream = [e for e in workflows if e.aggregate_id == victim]
    flaky = Flaky(WorkflowStore(libpq_url(fresh_db.role_database_url("projector"))))
    flaky.refuse.add(stream[1].event_id)
    await flaky.start()
    group, bootstrap = group_name(), fresh_db.kafka_bootstrap or ""
    ensure_topics(bootstrap, (dlq_topic(group),))
    dead = DeadLetters(group, bootstrap, pool)
    dead.listening = True  # as if watch() stood, hearing nothing
    processor = Processor(Projection(group, (), None, flaky), dead, RetryPolicy(attempts=1))
    try:
        await processor.process(records_of([e for e in world.events if e not in stream[2:]]))
        assert (await workflow_rows(fresh_db, world.tenant_id))[victim] == 1
        for n, event in enumerate(stream[2:], 100):  # one batch per event, as on Kafka
            await processor.process(records_of([event], start=n))
        assert (await workflow_rows(fresh_db, world.tenant_id))[victim] == 1, \
            "an event applied past the dead letter before it"
        assert set(await dead.parked({(world.tenant_id, victim)})) == {(world.tenant_id, victim)}
    finally:
        await flaky.close()


async def test_without_a_standing_listen_every_batch_reads(
        fresh_db: Settings, pool: AsyncConnectionPool) -> None:
    url, group = libpq_url(fresh_db.role_database_url("projector")), group_name()
    admin = libpq_url(fresh_db.database_url or "")
    stream = (uuid4(), uuid4())
    idle = DeadLetters(group, fresh_db.kafka_bootstrap or "", pool)  # no watch: a CLI, a test
    for _ in range(3):
        await idle.parked({stream})
    assert idle.reads == 3

    dead = DeadLetters(group, fresh_db.kafka_bootstrap or "", pool, keep_s=0.3)
    watching = asyncio.create_task(dead.watch(url))
    try:
        await eventually(lambda: asyncio.sleep(0, dead.listening))
        await dead.parked({stream})
        await dead.parked({stream})
        assert dead.reads == 1
        # Its LISTEN session is killed: until it is back, each batch reads.
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
                "current_database() AND "
                "query LIKE %s AND pid <> pg_backend_pid()",
                (f"LISTEN {deadletters.PARKED_NOTIFY_CHANNEL}%",))
        await eventually(lambda: asyncio.sleep(0, not dead.listening))
        before = dead.reads
        await dead.parked({stream})
        await dead.parked({stream})
        assert dead.reads == before + 2
        await eventually(lambda: asyncio.sleep(0, dead.listening))  # back after ~1 s
        await dead.parked({stream})
        kept = dead.reads
        await dead.parked({stream})
        assert dead.reads == kept
        # A kept set is read again after keep_s even if nothing was heard.
        await asyncio.sleep(0.35)
        await dead.parked({stream})
        assert dead.reads == kept + 1
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)

"""The stream-processing runtime against real stores and a real DLQ topic:
poison records, sequenced parking that survives a restart, release in order,
and a store outage that is waited out with nothing lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from uuid import UUID, uuid4

import psycopg
import pytest
from aiokafka.structs import ConsumerRecord
from psycopg_pool import AsyncConnectionPool

import contract
from infra.embedded_wheels import start_redis
from infra.kafka import read_from_start
from infra.servers import free_port
from infra.settings import Settings, libpq_url
from projectors.cache.layout import dashboard
from projectors.cache.store import CacheStore
from projectors.projection import Delivery, NonRetryable, Projection, Store
from projectors.workflows.store import WorkflowStore
from streams.deadletters import DeadLetters, Record, redrive
from streams.processor import Processor
from streams.wrappers import RetryPolicy
from tests.scenarios import build_world


class Flaky:
    """A real store that refuses chosen events, as if their data were bad."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.refuse: set[UUID] = set()

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def apply(self, batch: Sequence[Delivery]) -> None:
        bad = [d.envelope.event_id for d in batch if d.envelope.event_id in self.refuse]
        if bad:
            raise NonRetryable(f"refusing {bad}")
        await self.inner.apply(batch)


def records_of(envelopes: list[contract.EventEnvelope], start: int = 0) -> list[Record]:
    out = []
    for n, envelope in enumerate(envelopes, start):
        record = contract.to_record(envelope)
        out.append(Record(record.topic, 0, n, record.key, record.value, record.headers))
    return out


@pytest.fixture
async def pool(fresh_db: Settings) -> AsyncIterator[AsyncConnectionPool]:
    async with AsyncConnectionPool(libpq_url(fresh_db.role_database_url("projector")),
                                   min_size=1, max_size=2) as pool:
        yield pool


def group_name() -> str:
    return f"test-{uuid4().hex[:8]}"


async def workflow_rows(settings: Settings, tenant: UUID) -> dict[UUID, int]:
    async with await psycopg.AsyncConnection.connect(libpq_url(settings.database_url or "")
                                                     ) as conn:
        cur = await conn.execute("SELECT id, last_event_version FROM "
                                 "read_model.workflow_read_models WHERE tenant_id = %s",
                                 (tenant,))
        return dict(await cur.fetchall())


async def test_poison_records_go_to_the_dlq_and_the_batch_goes_on(
    fresh_db: Settings, pool: AsyncConnectionPool,
) -> None:
    world = build_world(workflows=4)
    store = WorkflowStore(libpq_url(fresh_db.role_database_url("projector")))
    await store.start()
    group = "workflow-projector"
    dead = DeadLetters(group, fresh_db.kafka_bootstrap or "", pool)
    processor = Processor(Projection(group, (), None, store), dead)
    poison = Record(contract.WORKFLOW_EVENTS.name, 5, 77, b"k", b"\x00 not an envelope", ())
    try:
        await processor.process([poison, *records_of(world.events)])
    finally:
        await store.close()
    assert len(await workflow_rows(fresh_db, world.tenant_id)) == 4
    raw = await read_raw(fresh_db.kafka_bootstrap or "", f"{group}.dlq")
    mine = [m for m in raw if dict(m.headers).get("dlq.original.offset") == b"77"]
    assert len(mine) == 1
    headers = {k: v.decode() for k, v in mine[0].headers}
    assert headers["dlq.error.class"] == "UndecodableRecord"
    assert headers["dlq.original.topic"] == contract.WORKFLOW_EVENTS.name
    assert headers["dlq.original.partition"] == "5" and headers["dlq.reason"] == "failed"
    assert mine[0].value == b"\x00 not an envelope"


async def read_raw(bootstrap: str, topic: str) -> list[ConsumerRecord]:
    return await read_from_start(bootstrap, topic)


async def test_a_dead_letter_parks_its_aggregate_across_restarts_until_released_in_order(
    fresh_db: Settings, pool: AsyncConnectionPool,
) -> None:
    world = build_world(workflows=6)
    workflows = [e for e in world.events if e.aggregate_type.value == "workflow"]
    victim = workflows[-1].aggregate_id  # the last workflow: approved after several steps
    stream = [e for e in workflows if e.aggregate_id == victim]
    bad = stream[1]  # its second event cannot be applied...
    flaky = Flaky(WorkflowStore(libpq_url(fresh_db.role_database_url("projector"))))
    flaky.refuse.add(bad.event_id)
    await flaky.start()
    group, bootstrap = group_name(), fresh_db.kafka_bootstrap or ""
    from contract import dlq_topic
    from infra.kafka import ensure_topics

    ensure_topics(bootstrap, (dlq_topic(group),))
    first_half = [e for e in world.events if e not in stream[3:]]
    try:
        processor = Processor(Projection(group, (), None, flaky),
                              DeadLetters(group, bootstrap, pool), RetryPolicy(attempts=2))
        await processor.process(records_of(first_half))
        # ...so v1 is applied, v2 is dead-lettered and v3 parked behind it; other
        # aggregates flow.
        rows = await workflow_rows(fresh_db, world.tenant_id)
        assert rows[victim] == 1
        assert all(v == world.states[w].version for w, v in rows.items() if w != victim)
        # A new processor (a restarted worker) still parks the rest of the stream.
        restarted = Processor(Projection(group, (), None, flaky),
                              DeadLetters(group, bootstrap, pool))
        await restarted.process(records_of(stream[3:], start=1000))
        assert (await workflow_rows(fresh_db, world.tenant_id))[victim] == 1
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT first_event_id, parked_events, error_class FROM "
                "streams.parked_aggregates WHERE consumer_group = %s", (group,))
            parked = await cur.fetchall()
        assert parked == [(bad.event_id, len(stream) - 1, "NonRetryable")]
        dlq = [m for m in await read_raw(bootstrap, f"{group}.dlq")
               if m.key == str(victim).encode()]
        assert [contract.decode_envelope(m.value).version for m in dlq] == \
            [e.version for e in stream[1:]]
        assert [dict(m.headers)["dlq.reason"] for m in dlq] == \
            [b"failed"] + [b"parked"] * (len(stream) - 2)

        # Still broken: a re-drive stops at the same event and keeps it parked.
        result = await redrive(DeadLetters(group, bootstrap, pool), flaky, world.tenant_id,
                               victim, bootstrap)
        assert (result.released, result.applied) == (False, 0)
        # Fixed: the re-drive applies the parked sequence in order and releases it.
        flaky.refuse.clear()
        result = await redrive(DeadLetters(group, bootstrap, pool), flaky, world.tenant_id,
                               victim, bootstrap)
        assert result.released and result.applied == len(stream) - 1
        assert (await workflow_rows(fresh_db, world.tenant_id))[victim] == stream[-1].version
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM streams.parked_aggregates "
                                     "WHERE consumer_group = %s", (group,))
            assert (await cur.fetchone()) == (0,)
    finally:
        await flaky.close()


@pytest.mark.slow
async def test_a_store_outage_is_waited_out_and_nothing_is_lost(
    fresh_db: Settings, pool: AsyncConnectionPool, tmp_path: Path,
) -> None:
    port = free_port()
    server = start_redis(tmp_path, port, timeout=30)
    store = CacheStore(server.url)
    await store.start()
    group = group_name()
    processor = Processor(Projection(group, (), None, store),
                          DeadLetters(group, fresh_db.kafka_bootstrap or "", pool),
                          RetryPolicy(base_s=0.05, max_s=0.3))
    world = build_world(workflows=12)
    records = records_of(world.events)
    try:
        await processor.process(records[:20])
        server.stop()  # Redis goes away mid-stream...
        work = asyncio.ensure_future(processor.process(records[20:]))
        await asyncio.sleep(1.5)
        assert not work.done()  # ...the batch waits instead of being dead-lettered
        server = start_redis(tmp_path, port, timeout=30)  # back, with its snapshot
        await asyncio.wait_for(work, 30)
        stats = await dashboard(store.client, world.tenant_id, world.clock)
        in_progress = sum(1 for s in world.states.values()
                          if getattr(s, "status", None) and s.status.value == "in_progress")
        assert stats["pending"] == in_progress
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM streams.parked_aggregates "
                                     "WHERE consumer_group = %s", (group,))
            assert (await cur.fetchone()) == (0,)
    finally:
        await store.close()
        server.stop()


async def test_notifications_are_suppressed_during_a_replay_unless_asked_for(
    settings: Settings,
) -> None:
    from projectors.derived import DerivedTopicStore, notification_records

    world = build_world(workflows=4)
    assigned = [e for e in world.events if e.event_type == "WorkflowStepAssigned"]
    bootstrap = settings.kafka_bootstrap or ""
    quiet = DerivedTopicStore(bootstrap, notification_records, side_effect=True)
    loud = DerivedTopicStore(bootstrap, notification_records, side_effect=True, on_replay=True)
    before = await read_raw(bootstrap, contract.NOTIFICATION_COMMANDS.name)
    await quiet.apply([Delivery(e, replay=True) for e in assigned])
    await quiet.close()
    after_quiet = await read_raw(bootstrap, contract.NOTIFICATION_COMMANDS.name)
    assert len(after_quiet) == len(before)
    await loud.apply([Delivery(e, replay=True) for e in assigned])
    await loud.close()
    after_loud = await read_raw(bootstrap, contract.NOTIFICATION_COMMANDS.name)
    new = after_loud[len(before):]
    assert len(new) == len(assigned)
    assert all(dict(r.headers)["ringiflow-replay"] == b"true" for r in new)


@pytest.mark.parametrize("others", [0, 250], ids=["few parked", "many parked"])
async def test_parked_lookup_finds_exactly_the_batch_streams_that_wait(
    fresh_db: Settings, pool: AsyncConnectionPool, others: int,
) -> None:
    """A batch asks which of its streams are parked. With few parked aggregates the
    group's are read whole; with more, only the batch's are looked up: both must find
    the same streams, per tenant (the same aggregate id under another tenant flows)."""
    from streams.deadletters import PARKED_READ_WHOLE

    assert others == 0 or others > PARKED_READ_WHOLE
    group = group_name()
    tenant, other_tenant = uuid4(), uuid4()
    parked_id, flowing_id = uuid4(), uuid4()
    async with pool.connection() as conn:
        for t, a in [(tenant, parked_id)] + [(uuid4(), uuid4()) for _ in range(others)]:
            await conn.execute(
                "INSERT INTO streams.parked_aggregates (consumer_group, aggregate_id, tenant_id,"
                " aggregate_type, first_event_id, first_version, last_version, error_class,"
                " error_message) VALUES (%s, %s, %s, 'workflow', %s, 2, 2, 'E', 'm')",
                (group, a, t, uuid4() if a != parked_id else parked_id))
    dead = DeadLetters(group, fresh_db.kafka_bootstrap or "", pool)
    found = await dead.parked({(tenant, parked_id), (tenant, flowing_id),
                               (other_tenant, parked_id)})
    assert found == {(tenant, parked_id): parked_id}
    assert await DeadLetters("another-group", fresh_db.kafka_bootstrap or "", pool).parked(
        {(tenant, parked_id)}) == {}


async def test_events_a_projection_does_not_handle_are_skipped_by_their_header(
    fresh_db: Settings, pool: AsyncConnectionPool,
) -> None:
    """The event_type header decides before decoding: an event type the projection does
    not handle is skipped even when its body is broken (a projection that handles it
    dead-letters it), while a broken record of a handled type is dead-lettered here."""
    from contract import dlq_topic
    from infra.kafka import ensure_topics

    group, bootstrap = group_name(), fresh_db.kafka_bootstrap or ""
    ensure_topics(bootstrap, (dlq_topic(group),))
    store = WorkflowStore(libpq_url(fresh_db.role_database_url("projector")))
    await store.start()
    processor = Processor(Projection(group, (), frozenset({"UserRegistered"}), store),
                          DeadLetters(group, bootstrap, pool))
    topic = contract.USER_EVENTS.name
    unwanted = Record(topic, 0, 88, b"k", b"\x00 broken", (("event_type", b"UserRenamed"),))
    wanted = Record(topic, 0, 89, b"k", b"\x00 broken", (("event_type", b"UserRegistered"),))
    try:
        assert await processor.process([unwanted, wanted]) == []
    finally:
        await store.close()
    offsets = [dict(m.headers)["dlq.original.offset"]
               for m in await read_raw(bootstrap, f"{group}.dlq")]
    assert offsets == [b"89"]

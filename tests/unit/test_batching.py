"""The batch drain's bookkeeping (streams.batching): what it commits, what it drops
on a rebalance, and that delivery gives way to a rebalance. The consumer is a real
Faust consumer that is never started; records are real aiokafka records."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiokafka.structs import ConsumerRecord
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from streams.batching import Batch, BatchConsumer, Ledger, batches
from streams.consumer import ProjectorApp

TOPIC = "ringiflow.workflow.events"
P0, P1 = TP(TOPIC, 0), TP(TOPIC, 1)


def records(tp: TP, offsets: range) -> list[ConsumerRecord]:
    return [ConsumerRecord(tp.topic, tp.partition, o, 0, 0, b"k", b"v", None, 1, 1, [])
            for o in offsets]


@pytest.fixture
async def consumer() -> AsyncIterator[BatchConsumer]:
    # Made inside the test's loop: the consumer's waits run on the app's loop.
    app = ProjectorApp("batching-test", fetch_max_wait_ms=100, broker="kafka://127.0.0.1:1")
    consumer = app.consumer
    assert isinstance(consumer, BatchConsumer)
    consumer.highwater = lambda tp: 100  # type: ignore[method-assign]  # not connected
    consumer.resume_flow()
    yield consumer


def committable(consumer: BatchConsumer, *tps: TP) -> dict[TP, int]:
    return consumer._filter_committable_offsets(tps)


def test_ledger_commits_the_lowest_unacknowledged_offset() -> None:
    ledger = Ledger()
    assert ledger.committable() is None
    ledger.delivered(10, 12)
    ledger.delivered(14, 15)  # 13 is a transaction marker: never delivered
    assert ledger.committable() == 10
    ledger.acknowledged(14)
    assert ledger.committable() == 10  # the head is still unapplied
    ledger.acknowledged(10)
    assert ledger.committable() == 16


async def test_a_later_batch_acknowledged_first_commits_nothing_past_the_head(
        consumer: BatchConsumer) -> None:
    queue = consumer.batch_queue([TOPIC])
    await consumer._deliver({P0: records(P0, range(0, 5))}, None, 0)
    await consumer._deliver({P0: records(P0, range(5, 10))}, None, 0)
    first, second = queue.queue.get_nowait(), queue.queue.get_nowait()
    second.ack()
    assert committable(consumer, P0).get(P0, 0) == 0  # 0..4 are not applied
    first.ack()
    assert committable(consumer, P0) == {P0: 10}


def test_faust_own_bookkeeping_commits_past_an_unacknowledged_head() -> None:
    """Why the guard exists (faust#606): with Faust's per-message acks, a partition
    never committed before commits offset 10 although offset 0 was never applied,
    and one committed at 10 lets 11 through while 10 is unapplied. If upstream fixes
    this, this test fails and the guard can be offered for removal."""
    app = faust_aiokafka_app()
    upstream = app.consumer
    assert not isinstance(upstream, BatchConsumer)
    for message in [upstream._to_message(P0, r) for r in records(P0, range(1, 10))]:
        upstream.ack(message)
    assert upstream._filter_committable_offsets([P0]) == {P0: 10}  # 0 is skipped
    upstream._committed_offset[P1] = 10
    upstream.ack(upstream._to_message(P1, records(P1, range(11, 12))[0]))
    assert upstream._filter_committable_offsets([P1]) == {P1: 12}  # 10 is skipped


def faust_aiokafka_app() -> object:
    import faust

    app = faust.App("upstream-test", broker="kafka://127.0.0.1:1")
    assert isinstance(app.consumer, faust_aiokafka.Consumer)
    app.topics.acks_enabled_for = lambda topic: True  # type: ignore[method-assign]
    return app


async def test_a_fetch_over_two_partitions_is_one_batch_acknowledged_per_partition(
        consumer: BatchConsumer) -> None:
    queue = consumer.batch_queue([TOPIC])
    await consumer._deliver({P0: records(P0, range(0, 3)), P1: records(P1, range(7, 9))},
                            None, 0)
    batch = queue.queue.get_nowait()
    assert [(r.partition, r.offset) for r in batch.records] == \
        [(0, 0), (0, 1), (0, 2), (1, 7), (1, 8)]
    assert committable(consumer, P0, P1) == {P0: 0, P1: 7}
    batch.ack()
    assert committable(consumer, P0, P1) == {P0: 3, P1: 9}


async def test_revocation_drops_queued_records_and_a_late_ack_commits_nothing(
        consumer: BatchConsumer) -> None:
    queue = consumer.batch_queue([TOPIC])
    await consumer._deliver({P0: records(P0, range(0, 3))}, None, 0)
    in_flight = queue.queue.get_nowait()  # the agent is applying this one
    await consumer._deliver({P0: records(P0, range(3, 6)), P1: records(P1, range(0, 2))},
                            None, 0)
    assert consumer.forget({P0}) == 3  # P0's queued records are dropped, P1's kept
    kept = queue.queue.get_nowait()
    assert [(r.partition, r.offset) for r in kept.records] == [(1, 0), (1, 1)]
    in_flight.ack()  # finished after P0 was revoked
    assert P0 not in committable(consumer, P0)
    # P0 comes back in the next assignment: a fresh ledger from the committed offset.
    await consumer._deliver({P0: records(P0, range(0, 3))}, None, 0)
    assert committable(consumer, P0) == {P0: 0}


async def test_a_delivery_waiting_on_a_full_queue_gives_way_to_a_rebalance(
        consumer: BatchConsumer) -> None:
    queue = consumer.batch_queue([TOPIC])
    for start in range(0, consumer.queued_fetches * 2, 2):
        await consumer._deliver({P0: records(P0, range(start, start + 2))}, None, 0)
    assert queue.queue.full()
    waiting = asyncio.ensure_future(
        consumer._deliver({P0: records(P0, range(10, 12))}, None, 0))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # a full queue holds the drain back: no more fetching
    consumer.stop_flow()  # a rebalance begins
    await asyncio.wait_for(waiting, 1)
    assert queue.queue.qsize() == consumer.queued_fetches  # 10, 11 were not delivered
    # A fetch that returns once the flow is stopped is not delivered either.
    consumer.resume_flow()
    await consumer._deliver({P0: records(P0, range(12, 14))}, None, 1)
    assert [b.records[0].offset for b in queue.queue._queue] == [0, 2]  # type: ignore[attr-defined]


async def test_refetched_offsets_are_not_delivered_twice(consumer: BatchConsumer) -> None:
    queue = consumer.batch_queue([TOPIC])
    await consumer._deliver({P0: records(P0, range(0, 4))}, None, 0)
    await consumer._deliver({P0: records(P0, range(2, 6))}, None, 0)
    assert [r.offset for b in queue.queue._queue for r in b.records] == \
        [0, 1, 2, 3, 4, 5]  # type: ignore[attr-defined]


async def test_one_topic_goes_to_one_agent(consumer: BatchConsumer) -> None:
    assert consumer.batch_queue([TOPIC]) is consumer.batch_queue([TOPIC])
    with pytest.raises(ValueError, match="already delivered to another agent"):
        consumer.batch_queue([TOPIC, "ringiflow.user.events"])


async def test_batches_needs_the_batch_consumer() -> None:
    import faust

    app = faust.App("plain", broker="kafka://127.0.0.1:1")
    stream = app.stream(app.topic("t"))
    with pytest.raises(TypeError, match="BatchConsumer"):
        batches(stream)


async def test_batch_length_is_its_records(consumer: BatchConsumer) -> None:
    assert len(Batch(records(P0, range(3)), 0.0, [], consumer)) == 3


async def test_a_fetch_before_its_agent_registers_waits_for_it(consumer: BatchConsumer) -> None:
    # The agent opens its stores before it asks for batches; a fetch that arrives
    # meanwhile must reach it, not Faust's per-message channel that nobody reads.
    waiting = asyncio.ensure_future(consumer._deliver({P0: records(P0, range(0, 3))}, None, 0))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    queue = consumer.batch_queue([TOPIC])
    await asyncio.wait_for(waiting, 1)
    assert [r.offset for r in queue.queue.get_nowait().records] == [0, 1, 2]


async def test_a_fetch_waiting_for_its_agent_gives_way_to_a_rebalance(
        consumer: BatchConsumer) -> None:
    waiting = asyncio.ensure_future(consumer._deliver({P0: records(P0, range(0, 3))}, None, 0))
    await asyncio.sleep(0.05)
    consumer.stop_flow()
    await asyncio.wait_for(waiting, 1)
    consumer.resume_flow()
    assert consumer.batch_queue([TOPIC]).queue.empty()
    assert P0 not in committable(consumer, P0)  # nothing delivered, nothing to commit

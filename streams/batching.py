"""Batch delivery for Faust: a fetched batch reaches its agent whole (issue 15, ADR 0009).

Faust's ``Consumer._drain_messages`` hands records to the conductor one at a time,
each through ``wait_first(callback(message), suspend_flow.wait())``: four tasks
created and three cancelled per record, so that nothing is delivered once a
rebalance has begun (faust-streaming #223). Then a lock per message, an event per
channel, and sensors and a locked ack per event in the stream iterator. A no-op
agent tops out near 10k records/s where aiokafka alone reads ~150k/s.

:class:`BatchConsumer` keeps what #223 protects and pays for it once per fetch,
not once per record:

* a fetch is delivered only if the flow is active and the consumer generation is
  the one it was fetched in, checked per batch; a delivery that has to wait (the
  agent's queue is full) waits against the suspend flag, as #223 does per record;
* on revocation, batches of the revoked partitions still queued are dropped, and
  their bookkeeping with them, so a late acknowledgement of an in-flight batch
  cannot commit anything for a partition this consumer no longer owns;
* the commit position of a partition is its lowest delivered, unacknowledged
  offset (or the end of what was delivered): never past an unapplied head
  message, which Faust's gap bookkeeping allows (faust#606: ``_new_offset``
  skips its head check when the committed offset is ``None`` or 0, and lets
  ``committed + 1`` through unacknowledged).

Topics whose agent asked for batches (:func:`batches`) are delivered this way.
In an app made with ``deliver_batches=True`` (:class:`streams.consumer.ProjectorApp`)
every topic is: a fetch that arrives before its agent has registered (the agent
may still be opening its stores) waits for it rather than falling to the
per-message path, whose channel nobody would read. In any other app, topics no
agent takes in batches go Faust's own per-message path unchanged. The agent stays a
Faust agent: Faust starts, supervises and subscribes it; it iterates batches
instead of events and acknowledges each batch once it is applied.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, StreamT


class Ledger:
    """One partition's delivered runs of records that are not acknowledged yet.

    A run is what one batch holds of the partition; it is acknowledged whole. Delivery
    is in offset order, so the first pending run starts at the lowest unapplied offset:
    the position to commit (Kafka commits the next offset to read). Bookkeeping per
    run, not per record."""

    __slots__ = ("end", "pending")

    def __init__(self) -> None:
        self.pending: dict[int, None] = {}  # first offsets of pending runs, in order
        self.end: int | None = None  # one past the last delivered offset

    def delivered(self, first: int, last: int) -> None:
        self.pending[first] = None
        self.end = last + 1

    def acknowledged(self, first: int) -> None:
        self.pending.pop(first, None)

    def committable(self) -> int | None:
        """The offset to commit: nothing unacknowledged lies below it."""
        for head in self.pending:
            return head
        return self.end


# What a batch holds of one partition: its ledger, the run's first and last offsets and
# its number of records.
Part = tuple[TP, Ledger, int, int, int]


@dataclass
class Batch:
    """Records of one fetch, in offset order per partition. :meth:`ack` once every
    record is applied or dead-lettered; until then none of them can be committed."""

    records: list[Any]  # aiokafka ConsumerRecord: topic, partition, offset, key, value, ...
    received: float  # time.time() the fetch reached the worker
    parts: list[Part] = field(repr=False)
    consumer: BatchConsumer = field(repr=False)

    def __len__(self) -> int:
        return len(self.records)

    def ack(self) -> None:
        self.consumer.ack_batch(self)


class BatchQueue:
    """What the drain hands to one agent: bounded, so a slow agent stops fetching."""

    def __init__(self, topics: Iterable[str], maxsize: int) -> None:
        self.topics = frozenset(topics)
        self.queue: asyncio.Queue[Batch] = asyncio.Queue(maxsize)

    def drop(self, revoked: set[TP]) -> int:
        """Forget queued records of revoked partitions; how many were dropped."""
        kept, dropped = [], 0
        while not self.queue.empty():
            batch = self.queue.get_nowait()
            records = [r for r in batch.records if TP(r.topic, r.partition) not in revoked]
            dropped += len(batch.records) - len(records)
            if records:
                kept.append(Batch(records, batch.received,
                                  [p for p in batch.parts if p[0] not in revoked],
                                  batch.consumer))
        for batch in kept:
            self.queue.put_nowait(batch)
        return dropped


class BatchConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer with a drain that delivers whole fetches."""

    #: Records a queue may hold per agent, in fetches (each <= broker_max_poll_records).
    queued_fetches = 2

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batch_queues: list[BatchQueue] = []
        self._queue_of_topic: dict[str, BatchQueue] = {}
        self._ledgers: dict[TP, Ledger] = {}
        self._registered = asyncio.Event()  # set whenever an agent asks for batches

    # -- the agent's side -------------------------------------------------------------

    def batch_queue(self, topics: Iterable[str]) -> BatchQueue:
        """Deliver these topics as batches, to the queue returned (one per agent)."""
        topics = set(topics)
        for queue in self._batch_queues:
            if queue.topics == topics:
                return queue
        taken = topics & self._queue_of_topic.keys()
        if taken:
            raise ValueError(f"topics {sorted(taken)} are already delivered to another agent")
        queue = BatchQueue(topics, self.queued_fetches)
        self._batch_queues.append(queue)
        self._queue_of_topic.update(dict.fromkeys(topics, queue))
        self._registered.set()
        return queue

    @property
    def delivers_batches_only(self) -> bool:
        """Every topic goes to an agent's batch queue, registered or still to come."""
        return bool(getattr(self.app, "deliver_batches", False))

    async def _queue_for(self, topic: str) -> BatchQueue | None:
        """The topic's queue, waiting for its agent to register; None if the flow
        stopped (a rebalance, a shutdown) while waiting."""
        while (queue := self._queue_of_topic.get(topic)) is None:
            self._registered.clear()
            await self.wait_first(self._registered.wait(), self.suspend_flow.wait())
            if not self.flow_active or self.should_stop:
                return None
        return queue

    def ack_batch(self, batch: Batch) -> None:
        """One acknowledgement per partition of the batch. A ledger replaced by a
        rebalance since delivery is left alone: its partition was revoked."""
        for tp, ledger, first, _last, count in batch.parts:
            if self._ledgers.get(tp) is ledger:
                ledger.acknowledged(first)
                self._n_acked += count

    # -- commits ----------------------------------------------------------------------

    def _filter_tps_with_pending_acks(self, topics: Any = None) -> Iterator[TP]:
        yield from super()._filter_tps_with_pending_acks(topics)
        for tp in self._ledgers:
            if topics is None or tp in topics or tp.topic in topics:
                yield tp

    def _new_offset(self, tp: TP) -> int | None:
        ledger = self._ledgers.get(tp)
        if ledger is None:
            return super()._new_offset(tp)
        return ledger.committable()

    # -- rebalances -------------------------------------------------------------------

    def forget(self, revoked: set[TP]) -> int:
        """Drop the bookkeeping and the queued records of revoked partitions; how many
        queued records were dropped (they are read again by the new owner)."""
        for tp in revoked:
            self._ledgers.pop(tp, None)
        return sum(queue.drop(revoked) for queue in self._batch_queues)

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        self.forget(revoked)
        await super().on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
        for tp in assigned:  # the position is re-read from the committed offsets
            self._ledgers.pop(tp, None)
        await super().on_partitions_assigned(assigned, generation_id)

    # -- the drain --------------------------------------------------------------------

    async def _drain_messages(self, fetcher: Any) -> None:
        if not (self._batch_queues or self.delivers_batches_only):
            return await super()._drain_messages(fetcher)
        consumer_stopped = self._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set
        try:
            while not (consumer_stopped() or fetcher_stopped()):
                records, active = await self._wait_next_records(1.0)
                await asyncio.sleep(0)  # getmany may return at once, again and again
                if not records or self.should_stop:
                    continue
                if not self.flow_active:  # fetched while a rebalance began: re-read later
                    await self.perform_seek()
                    continue
                await self._deliver(records, active, self.app.consumer_generation_id)
                if self._commit_every is not None and self._n_acked >= self._commit_every:
                    self._n_acked = 0
                    await self.commit()
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise

    async def _deliver(self, records: Mapping[TP, list[Any]], active: set[TP] | None,
                       generation: int) -> None:
        received = time.time()
        now = time.monotonic()
        monitor = self.app.monitor
        by_queue: dict[int, tuple[BatchQueue, list[Any], list[Part]]] = {}
        for tp, tp_records in records.items():
            if active is not None and tp not in active:
                continue
            queue = self._queue_of_topic.get(tp.topic)
            if queue is None and self.delivers_batches_only:
                queue = await self._queue_for(tp.topic)
                if queue is None:
                    return  # the new assignment seeks to the committed offsets
            if queue is None:  # not a batch topic: Faust's own path, one by one
                await self._deliver_each(tp, tp_records)
                continue
            ledger = self._ledgers.get(tp)
            if ledger is None:
                ledger = self._ledgers[tp] = Ledger()
            # A re-fetch after a seek back can repeat offsets already delivered.
            fresh = tp_records
            if ledger.end is not None and tp_records[0].offset < ledger.end:
                fresh = [r for r in tp_records if r.offset >= ledger.end]
                if not fresh:
                    continue
            _, batch_records, parts = by_queue.setdefault(id(queue), (queue, [], []))
            batch_records.extend(fresh)
            parts.append((tp, ledger, fresh[0].offset, fresh[-1].offset, len(fresh)))
            if monitor is not None:  # what Faust's livelock detector reads
                monitor.stream_inbound_time[tp] = now
                monitor.track_tp_end_offset(tp, self.highwater(tp))
        for queue, batch_records, parts in by_queue.values():
            if not self.flow_active or self.app.consumer_generation_id != generation:
                return  # a rebalance began: the new assignment seeks to the committed offsets
            # Pending before the agent can see them, so an early ack finds them; a
            # delivery abandoned below only holds the commit back until the rebalance
            # replaces these ledgers.
            for _, ledger, first, last, _count in parts:
                ledger.delivered(first, last)
            batch = Batch(batch_records, received, parts, self)
            if queue.queue.full():
                await self.wait_first(queue.queue.put(batch), self.suspend_flow.wait())
                if not self.flow_active:
                    return  # suspended while waiting; revocation drops what was queued
            else:
                queue.queue.put_nowait(batch)

    async def _deliver_each(self, tp: TP, records: list[Any]) -> None:
        """Faust's per-message delivery (``Consumer._drain_messages``), for a topic no
        agent takes in batches."""
        for record in records:
            offset, read = record.offset, self._read_offset[tp]
            if read is not None and offset < read:
                continue
            if read and offset - read > 1 and self.app.topics.acks_enabled_for(tp.topic):
                await self._add_gap(tp, read + 1, offset)
            await self.wait_first(self.callback(self._to_message(tp, record)),
                                  self.suspend_flow.wait())
            self._read_offset[tp] = offset

def batches(stream: StreamT) -> AsyncIterator[Batch]:
    """The agent's batches: every fetch of its topics, whole. Acknowledge each with
    :meth:`Batch.ack` once it is applied; nothing unacknowledged is ever committed.

    The topics are registered on the call, before the first iteration, so an agent
    can ask for its batches first and then open its stores."""
    consumer = stream.app.consumer
    if not isinstance(consumer, BatchConsumer):
        raise TypeError("batches() needs an app whose consumer is a BatchConsumer "
                        "(see streams.consumer.ProjectorApp)")
    queue = consumer.batch_queue(stream.channel.topics)  # type: ignore[attr-defined]
    return _iterate(stream, queue)


async def _iterate(stream: StreamT, queue: BatchQueue) -> AsyncIterator[Batch]:
    get = queue.queue.get
    while not stream.should_stop:
        yield await get()

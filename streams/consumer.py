"""How Faust hands records to a projector worker, without waiting that serves no one.

Two waits sat between the broker and the read models (issue 14):

* Faust builds its aiokafka consumer with ``fetch_max_wait_ms=1500``. Apache Kafka
  answers a fetch as soon as a record arrives, so there it costs nothing; Tansu holds
  every fetch for the whole wait, so each event waited ~0.7 s on average. The worker
  sets the wait (``RINGIFLOW_WORKER_FETCH_MAX_WAIT_MS``; by default 100 ms on Tansu,
  500 ms on Kafka) through :class:`ProjectorApp`, which is still a plain Faust app.
* ``Stream.noack_take(n, within)`` wakes on a clock: a lone event waits for the
  window to end. :func:`ready_batches` wakes when the first event is buffered and
  hands over whatever is buffered by then; under load, the events that arrive while
  a batch is being applied form the next batch, so batches still grow with the rate.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import EventT, StreamT

from infra.kafka import is_tansu

TANSU_FETCH_MAX_WAIT_MS = 100  # Tansu answers a fetch only when its wait runs out
KAFKA_FETCH_MAX_WAIT_MS = 500  # Kafka answers as soon as data arrives; this only paces idle


def fetch_max_wait_ms(bootstrap: str, configured: int | None) -> int:
    if configured is not None:
        return configured
    return TANSU_FETCH_MAX_WAIT_MS if is_tansu(bootstrap) else KAFKA_FETCH_MAX_WAIT_MS


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Read by AIOKafkaConsumer.start() when it builds its fetcher.
        consumer._fetch_max_wait_ms = self.app.fetch_max_wait_ms
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class ProjectorApp(faust.App):
    """A Faust app whose consumer fetches with `fetch_max_wait_ms`."""

    def __init__(self, *args: Any, fetch_max_wait_ms: int, **kwargs: Any) -> None:
        self.fetch_max_wait_ms = fetch_max_wait_ms
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)


async def ready_batches(stream: StreamT, max_: int) -> AsyncIterator[list[tuple[EventT, float]]]:
    """Batches of at most `max_` events, each with the time.time() it reached this
    worker, yielded as soon as one event is buffered. Acknowledges nothing: the
    caller acks each event once it is applied or dead-lettered (call on a
    ``stream.noack()`` stream). Built like ``Stream.noack_take``, woken by data
    instead of by a timer."""
    buffer: list[tuple[EventT, float]] = []
    ready = asyncio.Event()  # something is buffered
    consumed = asyncio.Event()  # the full buffer was handed over
    consuming: asyncio.Future | None = None  # set while the caller holds a batch

    async def add_to_buffer(value: Any) -> Any:
        nonlocal consuming
        if consuming is not None:  # the caller is applying a batch: this event is next
            try:
                await consuming
            finally:
                consuming = None
        event = stream.current_event
        if event is None:
            raise RuntimeError("Faust delivered a value without its event")
        buffer.append((event, time.time()))
        ready.set()
        if len(buffer) >= max_:  # never hand over more than max_
            consumed.clear()
            await stream.wait(consumed)  # type: ignore[arg-type]
        return value

    acks_were = stream.enable_acks
    stream.enable_acks = False
    stream.add_processor(add_to_buffer)
    stream._enable_passive(aiter(stream.channel))  # type: ignore[attr-defined, arg-type]
    try:
        while not stream.should_stop:
            await stream.wait_for_stopped(ready)  # type: ignore[arg-type]
            if not buffer:
                ready.clear()
                continue
            consuming = asyncio.get_running_loop().create_future()
            try:
                yield list(buffer)
            finally:
                buffer.clear()
                ready.clear()
                if not consuming.done():
                    consuming.set_result(None)
                consumed.set()
    finally:
        stream.enable_acks = acks_were
        stream._processors.remove(add_to_buffer)  # type: ignore[attr-defined]

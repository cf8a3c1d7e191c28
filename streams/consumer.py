"""How Faust hands records to a projector worker, without waiting that serves no one.

Two waits sat between the broker and the read models (issue 14):

* Faust builds its aiokafka consumer with ``fetch_max_wait_ms=1500``. Apache Kafka
  answers a fetch as soon as a record arrives, so there it costs nothing; Tansu holds
  every fetch for the whole wait, so each event waited ~0.7 s on average. The worker
  sets the wait (``RINGIFLOW_WORKER_FETCH_MAX_WAIT_MS``; by default 50 ms on Tansu,
  500 ms on Kafka) through :class:`ProjectorApp`, which is still a plain Faust app.
* ``Stream.noack_take(n, within)`` wakes on a clock: a lone event waits for the
  window to end. The consumer here is a :class:`streams.batching.BatchConsumer`:
  each fetch reaches the agent whole as soon as it arrives; under load, what arrives
  while a batch is being applied is the next fetch, so batches grow with the rate.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from infra.kafka import is_tansu
from streams.batching import BatchConsumer

# Tansu answers a fetch only when its wait runs out, so this bounds freshness there:
# 50 ms is ~15 ms of floor for ~7 % more of a core while idle than 100 ms (ADR 0008).
TANSU_FETCH_MAX_WAIT_MS = 50
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


class _Consumer(BatchConsumer):
    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class ProjectorApp(faust.App):
    """A Faust app whose consumer fetches with `fetch_max_wait_ms` and delivers whole
    fetches to agents that iterate :func:`streams.batching.batches`.

    With `deliver_batches` (the default) every topic of the app must be read that
    way: a fetch waits for its agent rather than take Faust's per-message path."""

    def __init__(self, *args: Any, fetch_max_wait_ms: int, deliver_batches: bool = True,
                 **kwargs: Any) -> None:
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.deliver_batches = deliver_batches
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)

"""Cross-cutting concerns around a projection's store, as wrappers with the store's own
interface (`projectors.projection.Store`): the processor applies a batch through
`Retrying(Traced(store))` and none of the stores knows about either.

* `Traced`: the `write <group>` span around each attempt (with the store client's own
  spans beneath it) and the write-duration histogram.
* `Retrying`: retryable failures retried with the shared backoff (`infra.retry`),
  bounded; an unreachable store waited out for as long as it takes, because nothing
  else could be applied either (lag and event age tell the operator)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram

from infra import tracing
from infra.retry import Backoff
from infra.telemetry import HOP_BUCKETS
from projectors.projection import Delivery, Retryable, Store, Unavailable

log = logging.getLogger("ringiflow.streams")

RETRIES = Counter("ringiflow_store_retries_total", "Store writes retried", ["group"])
WRITE_SECONDS = Histogram("ringiflow_store_write_seconds", "One store write (one attempt)",
                          ["group"], buckets=HOP_BUCKETS)


@dataclass
class RetryPolicy:
    attempts: int = 5  # for Retryable failures; Unavailable is retried without limit
    base_s: float = 0.1
    max_s: float = 5.0

    @property
    def backoff(self) -> Backoff:
        return Backoff(self.base_s, self.max_s)


class Traced:
    def __init__(self, inner: Store, group: str) -> None:
        self.inner, self.group = inner, group
        self.seconds = WRITE_SECONDS.labels(group)

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def apply(self, batch: Sequence[Delivery]) -> None:
        started = time.perf_counter()
        with tracing.tracer.start_as_current_span(
                f"write {self.group}", attributes={
                    "ringiflow.consumer_group": self.group,
                    "messaging.batch.message_count": len(batch)}):
            try:
                await self.inner.apply(batch)
            finally:
                self.seconds.observe(time.perf_counter() - started)


@dataclass
class Retrying:
    inner: Store
    group: str
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # set: stop waiting it out

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def apply(self, batch: Sequence[Delivery]) -> None:
        delays = self.policy.backoff.start()
        retries = RETRIES.labels(self.group)
        while True:
            try:
                await self.inner.apply(batch)
                return
            except Unavailable as exc:
                if self.stop.is_set():
                    raise
                delay = delays.next() if delays.attempts < 10 else delays.peek()
                log.warning("%s: store unavailable (%s); retrying in %.1f s", self.group,
                            exc, delay)
            except Retryable as exc:
                if delays.attempts + 1 >= self.policy.attempts:
                    raise
                delay = delays.next()
                log.warning("%s: retryable failure (%s); attempt %d of %d in %.2f s",
                            self.group, exc, delays.attempts + 1, self.policy.attempts, delay)
            retries.inc()
            await asyncio.sleep(delay)

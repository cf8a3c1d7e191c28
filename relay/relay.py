"""The relay loop: own lanes, fetch pending rows, produce, mark, repeat.

Woken by LISTEN/NOTIFY the moment rows are appended, with a polling fallback
because notifications can be missed. The lanes, the batch reads and the marks
share one connection: when it breaks, the lanes are gone, so whatever is still
queued in the producer is discarded before anything else happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta

import psycopg
from prometheus_client import Counter, Gauge, Histogram

from contract import OUTBOX_NOTIFY_CHANNEL, AggregateType, events_topic_name
from infra import kafka
from infra.settings import Settings, libpq_url
from relay import outbox
from relay.lanes import Lanes
from relay.marks import Marks
from relay.publisher import Outcome, Publisher, Row
from relay.reconcile import reconcile_on

log = logging.getLogger("ringiflow.relay")

TOPIC_CHECK_INTERVAL_S = 5.0
MARKS_FLUSH_INTERVAL_S = 1.0
EVENT_TOPICS = tuple(events_topic_name(t) for t in AggregateType)

PUBLISHED = Counter("ringiflow_relay_published_total", "Outbox rows acknowledged by Kafka")
FAILURES = Counter("ringiflow_relay_failures_total", "Rows not acknowledged", ["kind"])
BACKLOG = Gauge("ringiflow_relay_backlog", "Pending outbox rows")
OLDEST_AGE = Gauge("ringiflow_relay_oldest_pending_age_seconds", "Age of the oldest pending row")
FAILED_ROWS = Gauge("ringiflow_relay_failed_rows", "Rows marked failed (their aggregate waits)")
LANES_OWNED = Gauge("ringiflow_relay_lanes_owned", "Lanes this relay publishes")
HISTORY_LOSSES = Counter("ringiflow_relay_history_losses_total",
                         "Times the broker was found without events it had acknowledged")
LATENCY = Histogram("ringiflow_relay_commit_to_ack_seconds", "Outbox insert to broker ack",
                    buckets=(.001, .002, .005, .01, .02, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))


@dataclass
class Relay:
    settings: Settings
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    lanes: Lanes = field(default_factory=Lanes)
    running: bool = False
    publisher: Publisher = field(init=False)
    topics_checked_at: float = 0.0
    marks: Marks = field(default_factory=Marks)
    marks_flushed_at: float = 0.0
    # Why nothing can be published now (readiness is red while either is set).
    publish_error: str | None = None
    history_problem: str | None = None
    suspect: bool = True  # check the broker's history before the next batch

    def blocked(self) -> str | None:
        return self.history_problem or self.publish_error

    @property
    def url(self) -> str:
        return libpq_url(self.settings.role_database_url("relay"))

    def _publisher(self) -> Publisher:
        return Publisher(self.settings.require("kafka_bootstrap"),
                         self.settings.relay_message_timeout_ms)

    async def run(self) -> None:
        self.publisher = self._publisher()
        await self._ensure_topics()
        listener = asyncio.create_task(self._listen())
        housekeeping = asyncio.create_task(self._housekeeping())
        watcher = asyncio.create_task(self._watch_history())
        try:
            while not self.stop.is_set():
                try:
                    await self._session()
                except Exception as exc:  # the loop must outlive any failure
                    self.running = False
                    LANES_OWNED.set(0)
                    # The lanes went with the session: nothing queued may go out now.
                    self.publisher.discard_queued()
                    log.error("relay session ended (%s: %s); lanes released, starting over",
                              type(exc).__name__, exc, exc_info=not isinstance(
                                  exc, psycopg.OperationalError | psycopg.InterfaceError))
                    await self._sleep(1.0)
        finally:
            for task in (listener, housekeeping, watcher):
                task.cancel()
            await asyncio.gather(listener, housekeeping, watcher, return_exceptions=True)
            self.publisher.producer.flush(5)

    async def _session(self) -> None:
        """Read, produce and mark in a pipeline under load: while a large batch N is
        being produced, batch N+1 is read behind it (on a second connection). If the broker
        acknowledged every row of N, N+1 is produced while N is marked; otherwise
        N is marked first. N+1 never goes out before all of N is acknowledged, and
        after any unacknowledged row the next read starts over from the oldest
        pending row, so nothing overtakes what it follows."""
        connect = psycopg.AsyncConnection.connect
        async with await connect(self.url, autocommit=True) as conn, \
                await connect(self.url, autocommit=True) as reader:
            await self.lanes.join(conn)
            self.marks = Marks()
            self.suspect = True
            try:
                await self._publish_loop(conn, reader)
            finally:
                if not conn.closed:
                    with contextlib.suppress(psycopg.Error):
                        await self.marks.flush(conn)

    async def _publish_loop(self, conn: psycopg.AsyncConnection,
                            reader: psycopg.AsyncConnection) -> None:
        s = self.settings
        next_rebalance = 0.0
        self.running = True
        inflight: tuple[outbox.Batch, asyncio.Future[Outcome]] | None = None
        while not self.stop.is_set() or inflight:
            if inflight is None and time.monotonic() >= next_rebalance:
                before = set(self.lanes.owned)
                await self.lanes.rebalance(conn)
                LANES_OWNED.set(len(self.lanes.owned))
                next_rebalance = time.monotonic() + s.relay_rebalance_interval_s
                self.marks.drop(before - self.lanes.owned)
                if gained := self.lanes.owned - before:
                    await self.marks.load(conn, gained)
                    self.suspect = True
            if inflight is None and not self.stop.is_set() and \
                    not await self._history_intact(conn):
                await self._sleep(1.0)
                continue
            self.wake.clear()
            ahead = None
            # Reading ahead pays off only under load: below it, a batch holds what
            # arrived during one cycle, and the read behind it mostly finds nothing
            # (at 1,000 events/s it cost a query per cycle and gained no latency).
            if inflight is not None and inflight[0].cursor is not None and \
                    len(inflight[0].rows) >= s.relay_batch_size // 2 and \
                    not self.stop.is_set() and time.monotonic() < next_rebalance:
                ahead = asyncio.ensure_future(outbox.fetch_batch(
                    reader, self.lanes.owned, s.relay_batch_size, inflight[0].cursor))
            if inflight is not None:
                batch, producing = inflight
                outcome = await producing
                inflight = None
                following = await ahead if ahead is not None else None
                if following is not None and following.rows and not self.suspect and \
                        not self.publisher.disturbed.is_set() and \
                        outcome.acknowledged_all(batch.rows):
                    regressed = self.marks.advance(batch.rows, outcome)
                    if not regressed:  # N+1 goes out while N is marked
                        inflight = self._produce(following)
                    try:
                        await self._mark(conn, batch.rows, outcome, regressed)
                    except BaseException:
                        if inflight is not None:  # settled before the session ends
                            await asyncio.gather(inflight[1], return_exceptions=True)
                        raise
                    continue
                recorded = await self._mark(conn, batch.rows, outcome)
                if following is not None and not recorded.broken and not self.suspect:
                    inflight = self._produce(following)
                continue  # with nothing in flight: start over from the oldest pending row
            if self.stop.is_set():
                break
            batch = await outbox.fetch_batch(conn, self.lanes.owned, s.relay_batch_size)
            if batch.rows:
                inflight = self._produce(batch)
                continue
            await self._sleep(s.relay_poll_interval_s, self.wake)

    def _produce(self, batch: outbox.Batch) -> tuple[outbox.Batch, asyncio.Future[Outcome]] | None:
        if not batch.rows:
            return None
        return batch, asyncio.ensure_future(asyncio.to_thread(self.publisher.publish, batch.rows))

    async def _mark(self, conn: psycopg.AsyncConnection, rows: list[Row], result: Outcome,
                    regressed: list[str] | None = None) -> outbox.Recorded:
        """Record what the broker said of `rows` (`regressed`: `Marks.advance`
        already ran for them)."""
        s = self.settings
        if result.fatal:
            log.error("Kafka producer failed fatally (%s); replacing it", result.fatal)
            self.publisher.discard_queued()
            self.publisher = self._publisher()
        # A broker that restarted empty has no topics; depending on timing the
        # producer reports that as a missing topic or only as time-outs, so any
        # unacknowledged row checks the topics (at most every few seconds).
        if (result.missing_topic or result.errors) and \
                time.monotonic() - self.topics_checked_at > TOPIC_CHECK_INTERVAL_S:
            await self._ensure_topics()
        if regressed is None:
            regressed = self.marks.advance(rows, result)
        if regressed:
            log.critical("Kafka acknowledged records at offsets below earlier ones in %s: "
                         "the broker lost history; checking it before going on",
                         ", ".join(regressed))
            self.suspect = True
        recorded = await outbox.record(conn, rows, result, s.relay_max_attempts,
                                       s.relay_backoff_s, s.relay_max_backoff_s)
        if recorded.published:
            self.publish_error = None
        elif result.errors or result.fatal:
            why = result.fatal or next(iter(result.errors.values()))[0]
            self.publish_error = f"Kafka does not acknowledge ({why}); the rows wait in the outbox"
        if result.errors or result.fatal:
            self.suspect = True
        if time.monotonic() - self.marks_flushed_at >= MARKS_FLUSH_INTERVAL_S:
            await self.marks.flush(conn)
            self.marks_flushed_at = time.monotonic()
        PUBLISHED.inc(recorded.published)
        FAILURES.labels("transient").inc(recorded.retried)
        FAILURES.labels("permanent").inc(recorded.failed)
        for latency in recorded.latencies_s:
            LATENCY.observe(latency)
        return recorded

    async def _history_intact(self, conn: psycopg.AsyncConnection) -> bool:
        """Between batches, when due: does every partition still reach as far as
        this relay's lanes were acknowledged there? If not, the broker lost
        history: re-queue the lanes' tails from the events table (in version
        order, ahead of anything new) before publishing again."""
        self.publisher.serve_callbacks()
        if self.publisher.disturbed.is_set():
            self.publisher.disturbed.clear()
            self.suspect = True
        if not self.suspect:
            return True
        bootstrap = self.settings.require("kafka_bootstrap")
        try:
            ends = await kafka.partition_ends(bootstrap, EVENT_TOPICS)
        except Exception as exc:
            self.history_problem = ("cannot read the broker's partition ends "
                                    f"({type(exc).__name__}: {exc}); nothing is published "
                                    "until it can")
            log.warning("%s", self.history_problem)
            return False
        lost = self.marks.lost(ends, self.lanes.owned)
        if lost:
            HISTORY_LOSSES.inc()
            self.history_problem = ("Kafka lost events it had acknowledged (" + "; ".join(lost[:3])
                                    + "): re-publishing them in order from the events table")
            log.critical("%s", self.history_problem)
            # A new producer: the old one's idempotence state (producer id and
            # sequence numbers) belongs to the broker that was lost, and a fresh
            # broker would time its records out.
            self.publisher.discard_queued()
            self.publisher = self._publisher()
            if {t for t, _p in ends} < set(EVENT_TOPICS):
                await self._ensure_topics()
            reports = await reconcile_on(conn, bootstrap, None, False, log.warning,
                                         lanes=self.lanes.owned)
            await self.marks.forget(conn, self.lanes.owned)
            log.warning("re-queued %d events of %d aggregates in version order",
                        sum(r.requeued for r in reports),
                        sum(len(r.aggregates) for r in reports))
        self.history_problem = None
        self.suspect = False
        return True

    async def _watch_history(self) -> None:
        """The safety net behind the triggers (errors, broken connections, offsets
        going back): a periodic look at the partition ends, off the publishing
        path; anything odd makes the next gap between batches check for real."""
        while not self.stop.is_set():
            await self._sleep(self.settings.relay_history_check_interval_s)
            if self.suspect or not self.running:
                continue
            try:
                ends = await kafka.partition_ends(self.settings.require("kafka_bootstrap"),
                                                  EVENT_TOPICS)
            except Exception:
                self.suspect = True
                continue
            if self.marks.lost(ends, self.lanes.owned):
                self.suspect = True

    async def _sleep(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        waiters = [asyncio.ensure_future(self.stop.wait())]
        if wake is not None:
            waiters.append(asyncio.ensure_future(wake.wait()))
        _done, pending = await asyncio.wait(waiters, timeout=seconds,
                                            return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()

    async def _listen(self) -> None:
        """Turn NOTIFY into a wake-up; on any failure, fall back to polling and retry."""
        while not self.stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(self.url,
                                                                 autocommit=True) as conn:
                    await conn.execute(f"LISTEN {OUTBOX_NOTIFY_CHANNEL}")
                    async for _ in conn.notifies():
                        self.wake.set()
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                log.warning("LISTEN connection lost (%s); polling every %.1f s meanwhile", exc,
                            self.settings.relay_poll_interval_s)
                await self._sleep(2.0)

    async def _housekeeping(self) -> None:
        retention = timedelta(days=self.settings.outbox_retention_days)
        while not self.stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(self.url,
                                                                 autocommit=True) as conn:
                    while not self.stop.is_set():
                        current = await outbox.status(conn, failed_limit=0, count_published=False)
                        BACKLOG.set(current.pending)
                        OLDEST_AGE.set(current.oldest_pending_age_s or 0)
                        FAILED_ROWS.set(current.failed)
                        deleted = await outbox.cleanup(conn, retention)
                        if deleted:
                            log.info("deleted %d published outbox rows older than %s", deleted,
                                     retention)
                        await self._sleep(self.settings.relay_stats_interval_s)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                log.warning("housekeeping connection lost (%s)", exc)
                await self._sleep(5.0)

    async def _ensure_topics(self) -> None:
        self.topics_checked_at = time.monotonic()
        with contextlib.suppress(kafka.KafkaUnavailable):
            await asyncio.to_thread(kafka.ensure_topics, self.settings.require("kafka_bootstrap"))

"""`ringiflow lag`: per consumer group and partition, how far behind the topic's
end it is and how long its next unprocessed event has waited (event age: a
stalled consumer shows a growing age even when few records arrive); plus
parked aggregates and the outbox backlog. Exits non-zero when a
threshold is crossed, so it can drive an alert."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, replace

import psycopg
from aiokafka import TopicPartition
from confluent_kafka import ConsumerGroupTopicPartitions
from confluent_kafka import TopicPartition as KafkaPartition

from infra.kafka import admin_client, record_consumer, stop_consumer
from infra.settings import Settings, libpq_url
from projectors.catalogue import CATALOGUE


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int | None  # None: the group has committed nothing here yet
    end: int
    lag: int
    event_age_s: float | None = None  # age of the oldest unprocessed event; None: no lag


@dataclass(frozen=True)
class LagReport:
    partitions: list[PartitionLag]
    parked: dict[str, int]
    outbox_pending: int
    outbox_failed: int
    oldest_pending_s: float | None

    def as_dict(self) -> dict[str, object]:
        return {"partitions": [asdict(p) for p in self.partitions], "parked": self.parked,
                "outbox": {"pending": self.outbox_pending, "failed": self.outbox_failed,
                           "oldest_pending_s": self.oldest_pending_s}}

    def breaches(self, max_lag: int | None, max_outbox_age_s: float | None,
                 max_parked: int | None, max_event_age_s: float | None = None) -> list[str]:
        found = []
        if max_lag is not None:
            found += [f"{p.group} {p.topic}[{p.partition}] lag {p.lag} > {max_lag}"
                      for p in self.partitions if p.lag > max_lag]
        if max_event_age_s is not None:
            found += [f"{p.group} {p.topic}[{p.partition}] oldest unprocessed event waits "
                      f"{p.event_age_s:.0f} s > {max_event_age_s:.0f} s"
                      for p in self.partitions
                      if p.event_age_s is not None and p.event_age_s > max_event_age_s]
        if max_outbox_age_s is not None and (self.oldest_pending_s or 0) > max_outbox_age_s:
            found.append(f"oldest outbox row waits {self.oldest_pending_s:.0f} s > "
                         f"{max_outbox_age_s:.0f} s")
        if max_parked is not None:
            found += [f"{g}: {n} parked aggregates > {max_parked}"
                      for g, n in self.parked.items() if n > max_parked]
        if self.outbox_failed:
            found.append(f"{self.outbox_failed} outbox rows failed (ringiflow outbox status)")
        return found


async def event_ages(bootstrap: str, positions: list[tuple[str, int, int]]) -> list[float | None]:
    """For each (topic, partition, offset): seconds since the record there was
    written (Kafka timestamp), None if it cannot be read."""
    consumer = record_consumer(bootstrap)
    await consumer.start()
    try:
        tps = list({TopicPartition(t, p) for t, p, _ in positions})
        consumer.assign(tps)
        ages: list[float | None] = []
        for topic, partition, offset in positions:
            tp = TopicPartition(topic, partition)
            consumer.seek(tp, offset)
            got = await consumer.getmany(tp, timeout_ms=2000, max_records=1)
            records = got.get(tp, [])
            ages.append(max(time.time() - records[0].timestamp / 1000, 0.0) if records
                        else None)
        return ages
    finally:
        await stop_consumer(consumer)


async def end_offsets(bootstrap: str, topics: set[str]) -> dict[tuple[str, int], int]:
    consumer = record_consumer(bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t)
               or ()]
        return {(tp.topic, tp.partition): end
                for tp, end in (await consumer.end_offsets(tps)).items()}
    finally:
        await stop_consumer(consumer)


def committed_offsets(bootstrap: str, group: str,
                      partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int | None]:
    admin = admin_client(bootstrap)
    request = ConsumerGroupTopicPartitions(group, [KafkaPartition(t, p) for t, p in partitions])
    result = admin.list_consumer_group_offsets([request])[group].result(15)
    return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None)
            for tp in result.topic_partitions}


def report(settings: Settings) -> LagReport:
    bootstrap = settings.require("kafka_bootstrap")
    groups = {group: CATALOGUE[group](settings).topics for group in CATALOGUE}
    ends = asyncio.run(end_offsets(bootstrap, {t for ts in groups.values() for t in ts}))
    rows: list[PartitionLag] = []
    for group, topics in groups.items():
        mine = [key for key in ends if key[0] in topics]
        committed = committed_offsets(bootstrap, group, mine)
        for topic, partition in sorted(mine):
            done = committed.get((topic, partition))
            # Tansu's reported end can trail the last record by one: never below a commit.
            end = max(ends[(topic, partition)], done or 0)
            rows.append(PartitionLag(group, topic, partition, done, end, end - (done or 0)))
    lagging = [i for i, p in enumerate(rows) if p.lag > 0]
    if lagging:
        ages = asyncio.run(event_ages(bootstrap, [
            (rows[i].topic, rows[i].partition, rows[i].committed or 0) for i in lagging]))
        for i, age in zip(lagging, ages, strict=True):
            rows[i] = replace(rows[i], event_age_s=None if age is None else round(age, 1))
    with psycopg.connect(libpq_url(settings.require("database_url"))) as conn:
        parked = dict(conn.execute("SELECT consumer_group, count(*) FROM "
                                   "streams.parked_aggregates GROUP BY 1").fetchall())
        pending, failed, age = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'pending'), "
            "count(*) FILTER (WHERE status = 'failed'), extract(epoch FROM clock_timestamp() - "
            "min(created_at) FILTER (WHERE status = 'pending')) FROM event_store.outbox"
        ).fetchone()  # type: ignore[misc]
    return LagReport(rows, {g: int(parked.get(g, 0)) for g in groups}, int(pending),
                     int(failed), float(age) if age is not None else None)

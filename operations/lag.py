"""Consumer lag (`ringiflow lag`, the console): per consumer group and partition, how far
behind the topic's end it is and how long its next unprocessed event has waited (event age: a
stalled consumer shows a growing age even when few records arrive); plus
parked aggregates and the outbox backlog. Exits non-zero when a
threshold is crossed, so it can drive an alert."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import httpx
import psycopg
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from infra.kafka import record_consumer, stop_consumer, topic_partitions_of
from infra.settings import Settings, libpq_url
from projectors.catalogue import CATALOGUE
from streams.services import SERVICES


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
    # group -> the workers' recent received -> applied delay ({"p50_ms", "p99_ms",
    # "events", "window_s"}); None when the workers could not be asked
    apply_delays: dict[str, dict[str, Any] | None] | None = None

    def as_dict(self) -> dict[str, object]:
        return {"partitions": [asdict(p) for p in self.partitions], "parked": self.parked,
                "outbox": {"pending": self.outbox_pending, "failed": self.outbox_failed,
                           "oldest_pending_s": self.oldest_pending_s},
                "apply_delay": self.apply_delays}

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


async def committed_offsets(admin: AIOKafkaAdminClient, group: str,
                            partitions: list[tuple[str, int]],
                            ) -> dict[tuple[str, int], int | None]:
    """The group's committed offsets. Through aiokafka: librdkafka's admin client
    crashes the process (SIGSEGV in rd_kafka_cgrp_op) when the broker answers
    COORDINATOR_LOAD_IN_PROGRESS, as a fresh Apache Kafka does for a while."""
    wanted = [TopicPartition(t, p) for t, p in partitions]
    for attempt in range(40):
        try:
            result = await admin.list_consumer_group_offsets(group, partitions=wanted)
            break
        except KafkaError as exc:
            if not exc.retriable or attempt == 39:
                raise
            await asyncio.sleep(0.25)
    return {(tp.topic, tp.partition): (meta.offset if meta.offset >= 0 else None)
            for tp, meta in result.items()}


async def partitions(bootstrap: str, groups: dict[str, tuple[str, ...]]) -> list[PartitionLag]:
    """Lag of every group on every partition it reads, and for the lagging ones the
    age of the next unprocessed record (its Kafka timestamp); one consumer for all."""
    tps = await topic_partitions_of(bootstrap, *sorted({t for ts in groups.values() for t in ts}))
    consumer = record_consumer(bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await consumer.start()
    await admin.start()
    try:
        ends = {(tp.topic, tp.partition): end
                for tp, end in (await consumer.end_offsets(tps)).items()}
        rows: list[PartitionLag] = []
        for group, topics in groups.items():
            mine = [key for key in ends if key[0] in topics]
            committed = await committed_offsets(admin, group, mine)
            for topic, partition in sorted(mine):
                done = committed.get((topic, partition))
                # Tansu's reported end can trail the last record by one: never below a commit
                # (on Apache Kafka a commit is never past the end, so this changes nothing).
                end = max(ends[(topic, partition)], done or 0)
                rows.append(PartitionLag(group, topic, partition, done, end, end - (done or 0)))
        consumer.assign(tps)
        for i, row in enumerate(rows):
            if row.lag > 0:
                tp = TopicPartition(row.topic, row.partition)
                consumer.seek(tp, row.committed or 0)
                records = (await consumer.getmany(tp, timeout_ms=2000, max_records=1)).get(tp)
                if records:
                    age = max(time.time() - records[0].timestamp / 1000, 0.0)
                    rows[i] = replace(row, event_age_s=round(age, 1))
        return rows
    finally:
        await admin.close()
        await stop_consumer(consumer)


def apply_delays(settings: Settings) -> dict[str, dict[str, Any] | None] | None:
    """Ask the running workers (`ringiflow run workers`) for each group's recent delays."""
    try:
        answer = httpx.get(f"http://{settings.workers_host}:{settings.workers_port}"
                           "/apply-delay", timeout=5)
        answer.raise_for_status()
        return answer.json()
    except (httpx.HTTPError, ValueError):
        return None


def report(settings: Settings) -> LagReport:
    groups = {group: CATALOGUE[group](settings).topics for group in CATALOGUE}
    groups |= {service.group: service.topics for service in SERVICES.values()}
    rows = asyncio.run(partitions(settings.require("kafka_bootstrap"), groups))
    with psycopg.connect(libpq_url(settings.require("database_url"))) as conn:
        parked = dict(conn.execute("SELECT consumer_group, count(*) FROM "
                                   "streams.parked_aggregates GROUP BY 1").fetchall())
        pending, failed, age = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'pending'), "
            "count(*) FILTER (WHERE status = 'failed'), extract(epoch FROM clock_timestamp() - "
            "min(created_at) FILTER (WHERE status = 'pending')) FROM event_store.outbox"
        ).fetchone()  # type: ignore[misc]
    return LagReport(rows, {g: int(parked.get(g, 0)) for g in groups}, int(pending),
                     int(failed), float(age) if age is not None else None,
                     apply_delays(settings))

"""Kafka administration: the topic catalogue made real, and offset look-ups."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from functools import cache

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from contract import Topic, all_topics


class KafkaUnavailable(RuntimeError):
    pass


# Broker settings RingiFlow relies on, for the embedded Apache Kafka and for
# docker-compose.yml alike (tests/test_compose.py compares them).
BROKER_CONFIG: dict[str, str] = {
    # Topics are created explicitly (`ringiflow topics ensure`) with their partitions and
    # retention; a typo must fail loudly, not create a 1-partition topic.
    "auto.create.topics.enable": "false",
    # Single node: internal topics cannot have more replicas than brokers.
    "offsets.topic.replication.factor": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    # A worker's first join takes ~2 s instead of ~5 s.
    "group.initial.rebalance.delay.ms": "0",
}


@cache
def is_tansu(bootstrap: str) -> bool:
    """Whether the broker is the Tansu stand-in, whose quirks some readers work
    around (its end offset can trail the last record by one)."""
    try:
        metadata = admin_client(bootstrap).list_topics(timeout=10)
    except KafkaException:
        return False
    return metadata.cluster_id == "tansu_cluster"


@dataclass(frozen=True)
class TopicReport:
    name: str
    state: str  # created | exists | partition_mismatch
    partitions: int
    wanted_partitions: int


def admin_client(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 5000})


def ensure_topics(
    bootstrap: str, topics: tuple[Topic, ...] | None = None, replication_factor: int = 1,
    timeout: float = 15.0,
) -> list[TopicReport]:
    """Create missing topics explicitly (broker auto-create is off in production).

    An existing topic with a different partition count is reported, never
    changed: repartitioning moves keys and breaks per-aggregate order.
    """
    topics = topics or all_topics()
    admin = admin_client(bootstrap)
    try:
        existing = admin.list_topics(timeout=timeout).topics
    except KafkaException as exc:
        raise KafkaUnavailable(
            f"cannot reach Kafka at {bootstrap} (RINGIFLOW_KAFKA_BOOTSTRAP): {exc}"
        ) from exc
    reports: list[TopicReport] = []
    missing = [t for t in topics if t.name not in existing]
    for topic in topics:
        if topic.name in existing:
            have = len(existing[topic.name].partitions)
            state = "exists" if have == topic.partitions else "partition_mismatch"
            reports.append(TopicReport(topic.name, state, have, topic.partitions))
    if missing:
        futures = admin.create_topics(
            [NewTopic(t.name, t.partitions, replication_factor, config=t.config())
             for t in missing],
            operation_timeout=timeout, request_timeout=timeout,
        )
        for topic in missing:
            try:
                futures[topic.name].result(timeout)
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":  # a racing `ensure`
                    raise KafkaUnavailable(f"creating topic {topic.name} failed: {exc}") from exc
            reports.append(TopicReport(topic.name, "created", topic.partitions, topic.partitions))
    return reports


def topic_partitions(bootstrap: str, timeout: float = 10.0) -> dict[str, int]:
    metadata = admin_client(bootstrap).list_topics(timeout=timeout)
    return {name: len(t.partitions) for name, t in metadata.topics.items()}


def producer_config(bootstrap: str, **overrides: object) -> dict[str, object]:
    """Idempotent, fully acknowledged, and partitioned exactly as the Java client
    and aiokafka partition (murmur2), so a key lands on the same partition
    whoever produces it."""
    return {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "partitioner": "murmur2_random",
        "linger.ms": 1,
        "compression.type": "none",
        **overrides,
    }


def producer(bootstrap: str, **overrides: object) -> Producer:
    return Producer(producer_config(bootstrap, **overrides))


def record_consumer(bootstrap: str, *topics: str, group_id: str | None = None,
                    **kwargs: object) -> AIOKafkaConsumer:
    """An aiokafka consumer (confluent-kafka's consumer is slow against Tansu)."""
    return AIOKafkaConsumer(
        *topics, bootstrap_servers=bootstrap, group_id=group_id,
        enable_auto_commit=False, auto_offset_reset="earliest", **kwargs,  # type: ignore[arg-type]
    )


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """Stop an aiokafka consumer. A consumer without a group stopped right after
    an assignment can raise CancelledError from its own internal task (aiokafka
    cancels a task that never ran); that one is not ours to propagate."""
    import asyncio

    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


async def read_from_start(bootstrap: str, topic: str,
                          partitions: list[int] | None = None) -> list[ConsumerRecord]:
    """Every record a topic (or some of its partitions) holds now, in partition
    order. On Tansu, whose end offset can trail the last acknowledged record by
    one, it reads on until an empty poll past the reported ends."""
    import asyncio

    trailing_ends = await asyncio.to_thread(is_tansu, bootstrap)
    numbers = partitions if partitions is not None else sorted(
        await partitions_of(bootstrap, topic))
    tps = [TopicPartition(topic, p) for p in numbers]
    consumer = record_consumer(bootstrap)
    await consumer.start()
    try:
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[ConsumerRecord] = []
        while True:
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                out.extend(messages)
            if (not batch or not trailing_ends) and all(
                    [await consumer.position(tp) >= ends[tp] for tp in tps]):
                return out
    finally:
        await stop_consumer(consumer)


def partition_numbers(bootstrap: str, *topics: str) -> dict[str, set[int]]:
    """Each topic's partition numbers, from the broker's metadata in one request.
    (aiokafka's `partitions_for_topic` knows only topics a consumer subscribed to:
    against Apache Kafka a plain consumer's metadata holds none.)"""
    found = admin_client(bootstrap).list_topics(timeout=10).topics
    return {t: set(found[t].partitions) if t in found and found[t].error is None else set()
            for t in topics}


async def partitions_of(bootstrap: str, topic: str) -> set[int]:
    return partition_numbers(bootstrap, topic)[topic]


async def topic_partitions_of(bootstrap: str, *topics: str) -> list[TopicPartition]:
    """Every partition of the topics, in order, as aiokafka's TopicPartitions."""
    numbers = partition_numbers(bootstrap, *topics)
    return [TopicPartition(t, n) for t in topics for n in sorted(numbers[t])]


async def partition_ends(bootstrap: str, topics: Collection[str],
                         timeout_s: float = 10.0) -> dict[tuple[str, int], int]:
    """Each existing partition's end offset (a missing topic has no entries)."""
    import asyncio

    assigned = await asyncio.to_thread(
        lambda: [TopicPartition(t, n) for t, numbers in partition_numbers(bootstrap, *topics)
                 .items() for n in sorted(numbers)])
    if not assigned:
        return {}
    consumer = record_consumer(bootstrap, group_id=None, request_timeout_ms=int(timeout_s * 1000))
    try:  # a start that times out or is cancelled leaves a client to close as well
        await asyncio.wait_for(consumer.start(), timeout_s)
        ends = await asyncio.wait_for(consumer.end_offsets(assigned), timeout_s)
        return {(tp.topic, tp.partition): offset for tp, offset in ends.items()}
    finally:
        await stop_consumer(consumer)

"""Projector throughput per worker (issue 5).

    python -m benchmarks.projectors [--workflows 3000] [--rounds 1]

Events of realistic workflows (the real domain) are produced straight onto the
topics of an embedded stack. Then, for each projection:
  * Faust: its worker (`ringiflow projector <group>`) consumes them from the
    start; events/s from its first to its last committed offset;
  * baseline, same run: a raw aiokafka consumer reading the same records with
    the same store's batched apply, no Faust.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import contract
from benchmarks.common import add_broker_flag, app_env, embedded_stack
from infra.embedded import free_port
from infra.kafka import producer, record_consumer, stop_consumer, topic_partitions_of
from infra.settings import Settings
from projectors.catalogue import CATALOGUE
from projectors.projection import Delivery
from tests.scenarios import build_world

TARGETS = {"workflow-projector": 5000, "cache-projector": 10000, "search-indexer": 3000}


def produce_world(settings: Settings, workflows: int) -> int:
    p = producer(settings.kafka_bootstrap or "", **{"linger.ms": 5})
    count = 0
    for chunk in range(0, workflows, 200):
        world = build_world(workflows=min(200, workflows - chunk), seed=chunk)
        for envelope in world.events:
            record = contract.to_record(envelope)
            while True:
                try:
                    p.produce(record.topic, record.value, record.key,
                              headers=list(record.headers))
                    break
                except BufferError:
                    p.poll(0.05)
            count += 1
    p.flush(60)
    return count


async def topic_total(bootstrap: str, topics: tuple[str, ...]) -> int:
    tps = await topic_partitions_of(bootstrap, *topics)
    consumer = record_consumer(bootstrap)
    await consumer.start()
    try:
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await stop_consumer(consumer)


def seen_by(metrics_url: str, group: str) -> int:
    """Events the worker has finished with (applied, skipped or dead-lettered)."""
    import httpx

    try:
        text = httpx.get(metrics_url, timeout=2).text
    except httpx.HTTPError:
        return 0
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("ringiflow_events_processed_total{", "ringiflow_events_skipped_total{",
                            "ringiflow_events_failed_total{")) and f'group="{group}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def faust_rate(settings: Settings, group: str, total: int) -> float:
    # RINGIFLOW_WORKER_* tuning from this environment passes through.
    tuning = {k: v for k, v in os.environ.items() if k.startswith("RINGIFLOW_WORKER_")}
    env = app_env(settings, **tuning)
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "ringiflow", "projector", group, "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    metrics = f"http://127.0.0.1:{port}/metrics"
    try:
        while (first := seen_by(metrics, group)) == 0:
            time.sleep(0.01)
        started = time.perf_counter()
        while (done := seen_by(metrics, group)) < total:
            time.sleep(0.05)
        return (done - first) / (time.perf_counter() - started)
    finally:
        worker.terminate()
        worker.wait(60)


async def baseline_rate(settings: Settings, group: str, batch: int) -> float:
    projection = CATALOGUE[group](settings)
    store = projection.store
    await store.start()
    tps = await topic_partitions_of(settings.kafka_bootstrap or "", *projection.topics)
    consumer = record_consumer(settings.kafka_bootstrap or "", max_poll_records=batch)
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        total = sum(ends.values())
        seen, started = 0, time.perf_counter()
        while seen < total:
            polled = await consumer.getmany(timeout_ms=500, max_records=batch)
            deliveries = []
            for messages in polled.values():
                seen += len(messages)
                for m in messages:
                    envelope = contract.decode_envelope(m.value)
                    if projection.handles(envelope.event_type):
                        deliveries.append(Delivery(envelope))
            if deliveries:
                await store.apply(deliveries)
            if not polled:
                break
        return seen / (time.perf_counter() - started)
    finally:
        await stop_consumer(consumer)
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workflows", type=int, default=3000)
    add_broker_flag(parser)
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}; embedded stack (fsync on)")
    with embedded_stack(broker=args.broker) as settings:
        events = produce_world(settings, args.workflows)
        print(f"produced {events:,} events of {args.workflows:,} workflows")
        for group in CATALOGUE:
            topics = CATALOGUE[group](settings).topics
            total = asyncio.run(topic_total(settings.kafka_bootstrap or "", topics))
            faust = faust_rate(settings, group, total)
            # A fresh namespace would be fairer for the baseline's writes; the stores are
            # idempotent, so re-applying the same events costs the same checks.
            base = asyncio.run(baseline_rate(settings, group, settings.worker_batch_size))
            target = TARGETS.get(group)
            note = f" (target >= {target:,}/s)" if target else ""
            print(f"{group:<24} Faust {faust:>8,.0f} events/s   raw aiokafka + same store "
                  f"{base:>8,.0f} events/s   ratio {faust / base:.2f}{note}")


if __name__ == "__main__":
    main()

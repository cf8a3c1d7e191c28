"""Projector throughput per worker (issue 5).

    python -m benchmarks.projectors [--workflows 10000] [--rounds 3] [--broker apache|tansu]
        [--groups G ...] [--no-noop]

Events of realistic workflows (the real domain) are produced straight onto the
topics of an embedded stack. Then, for each projection:
  * Faust: its worker (`ringiflow projector <group>`, as benchmarks.projector_worker
    runs it under a new consumer group each round) consumes them from the
    start; events/s from the end of its first batch to the end of its last;
  * baseline, same run: a raw aiokafka consumer reading the same records with
    the same store's batched apply and the same event-type filter, no Faust,
    timed the same way; each as the median of rounds in alternating order.
Then Faust itself: a no-op agent (benchmarks.noop_agent) on the batch drain and on
Faust's own per-record path, next to aiokafka alone doing nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import time
import uuid

import psycopg
import redis.asyncio as redis

import contract
from benchmarks.common import add_broker_flag, app_env, embedded_stack
from infra.kafka import producer, record_consumer, stop_consumer, topic_partitions_of
from infra.servers import free_port
from infra.settings import Settings, libpq_url
from projectors.catalogue import CATALOGUE
from projectors.projection import Delivery
from tests.scenarios import build_world

NOOP_TARGET = 50_000
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


async def empty_read_model(settings: Settings, group: str, run: str) -> Settings:
    """Settings whose read model for `group` is empty: a new index behind a new alias
    for the search indexer, emptied tables or cache for the others. The derived-record
    processors keep no state."""
    if group == "search-indexer":
        return settings.model_copy(update={"search_alias": f"{settings.search_alias}-{run}"})
    if group == "workflow-projector":
        async with await psycopg.AsyncConnection.connect(
                libpq_url(settings.require("database_url")), autocommit=True) as conn:
            # read_model is views over the live version, v1 on a fresh stack (ADR 0005).
            await conn.execute("TRUNCATE " + ", ".join(f"read_model_v1.{t}" for t in (
                "workflow_steps", "my_tasks", "workflow_history", "workflow_read_models",
                "users", "definitions")))
    if group == "cache-projector":
        client = redis.Redis.from_url(settings.require("redis_url"))
        try:
            await client.flushdb()
        finally:
            await client.aclose()
    return settings


def faust_rate(settings: Settings, group: str, total: int) -> float:
    # RINGIFLOW_WORKER_* tuning from this environment passes through.
    tuning = {k: v for k, v in os.environ.items() if k.startswith("RINGIFLOW_WORKER_")}
    env = app_env(settings, RINGIFLOW_SEARCH_ALIAS=settings.search_alias, **tuning)
    port = free_port()
    # Its own consumer group each round: it reads the topics from the start.
    worker = subprocess.Popen([sys.executable, "-m", "benchmarks.projector_worker", group,
                               f"{group}-bench-{uuid.uuid4().hex[:8]}", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = f"http://127.0.0.1:{port}/metrics"
    try:
        while (first := seen_by(metrics, group)) == 0:
            time.sleep(0.01)
        started = time.perf_counter()
        while (done := seen_by(metrics, group)) < total:
            # A scrape costs the worker a /metrics render on its own loop: poll the
            # way a Prometheus would, not at a rate that takes a tenth of its CPU, and
            # often only near the end, which is the instant timed.
            time.sleep(0.25 if done < 0.9 * total else 0.005)
        return (done - first) / (time.perf_counter() - started)
    finally:
        worker.terminate()
        worker.wait(60)


def noop_faust_rate(settings: Settings, topics: tuple[str, ...], total: int, path: str) -> float:
    """A no-op Faust agent's records/s (benchmarks.noop_agent), in its own process."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.noop_agent", "--bootstrap",
         settings.kafka_bootstrap or "", "--topics", *topics, "--total", str(total),
         "--path", path, "--max-poll-records", str(settings.worker_batch_size)],
        env=app_env(settings), capture_output=True, text=True, timeout=600)
    found = re.findall(r"RATE (\d+)/([\d.]+)", out.stdout)
    if not found:
        raise RuntimeError(f"the no-op agent reported nothing: {out.stderr[-2000:]}")
    records, seconds = found[-1]
    return int(records) / float(seconds)


async def noop_raw_rate(settings: Settings, topics: tuple[str, ...], batch: int) -> float:
    """aiokafka alone reading the same records and doing nothing with them."""
    tps = await topic_partitions_of(settings.kafka_bootstrap or "", *topics)
    consumer = record_consumer(settings.kafka_bootstrap or "", max_poll_records=batch)
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        total = sum((await consumer.end_offsets(tps)).values())
        first = await consumer.getmany(timeout_ms=5000, max_records=batch)
        seen, started = 0, time.perf_counter()
        while seen + sum(map(len, first.values())) < total:
            polled = await consumer.getmany(timeout_ms=500, max_records=batch)
            if not polled:
                break
            seen += sum(map(len, polled.values()))
        return seen / (time.perf_counter() - started)
    finally:
        await stop_consumer(consumer)


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
        # Timed as the worker is: from the end of the first batch to the end of the last.
        seen, first, started = 0, 0, 0.0
        while seen < total:
            polled = await consumer.getmany(timeout_ms=500, max_records=batch)
            deliveries = []
            for messages in polled.values():
                seen += len(messages)
                for m in messages:
                    # The worker's own filter: an event type the projection does not
                    # handle (its header says) is skipped undecoded.
                    named = dict(m.headers).get("event_type")
                    if named is not None and not projection.handles(named.decode()):
                        continue
                    envelope = contract.decode_envelope(m.value)
                    if projection.handles(envelope.event_type):
                        deliveries.append(Delivery(envelope))
            if deliveries:
                await store.apply(deliveries)
            if not polled:
                break
            if not started:
                first, started = seen, time.perf_counter()
        return (seen - first) / (time.perf_counter() - started)
    finally:
        await stop_consumer(consumer)
        await store.close()


def projection_rates(settings: Settings, group: str, rounds: int) -> tuple[float, float]:
    """Median events/s of the Faust worker and of the raw baseline over `rounds` rounds,
    the order alternating: the first run of a round warms the servers (OpenSearch's
    JIT, the broker's page cache) for the second, which flattered whichever ran last."""
    topics = CATALOGUE[group](settings).topics
    total = asyncio.run(topic_total(settings.kafka_bootstrap or "", topics))
    rates: dict[str, list[float]] = {"faust": [], "raw": []}
    for round_ in range(rounds):
        for kind in (("faust", "raw") if round_ % 2 == 0 else ("raw", "faust")):
            # Each run starts from an empty read model: re-applying events a store already
            # holds is cheaper (an idempotent skip writes nothing).
            fresh = asyncio.run(empty_read_model(settings, group, f"{kind}{round_}"))
            rates[kind].append(
                faust_rate(fresh, group, total) if kind == "faust" else
                asyncio.run(baseline_rate(fresh, group, settings.worker_batch_size)))
    return statistics.median(rates["faust"]), statistics.median(rates["raw"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workflows", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--groups", nargs="*", choices=sorted(CATALOGUE), default=list(CATALOGUE),
                        help="the projections to time (default: all; none: only the no-op agent)")
    parser.add_argument("--no-noop", dest="noop", action="store_false",
                        help="skip the no-op agent comparison")
    add_broker_flag(parser)
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}; embedded stack (fsync on); medians of {args.rounds} "
          f"rounds, Faust and raw in alternating order")
    with embedded_stack(broker=args.broker) as settings:
        events = produce_world(settings, args.workflows)
        print(f"produced {events:,} events of {args.workflows:,} workflows")
        for group in args.groups:
            faust, base = projection_rates(settings, group, args.rounds)
            target = TARGETS.get(group)
            note = f" (target >= {target:,}/s)" if target else ""
            print(f"{group:<24} Faust {faust:>8,.0f} events/s   raw aiokafka + same store "
                  f"{base:>8,.0f} events/s   ratio {faust / base:.2f}{note}", flush=True)
        if not args.noop:
            return
        # Faust itself: a no-op agent over every event topic, medians.
        topics = tuple(sorted({t for g in CATALOGUE for t in CATALOGUE[g](settings).topics}))
        total = asyncio.run(topic_total(settings.kafka_bootstrap or "", topics))
        rates: dict[str, list[float]] = {"raw": [], "batches": [], "events": []}
        for _ in range(args.rounds):
            rates["raw"].append(asyncio.run(
                noop_raw_rate(settings, topics, settings.worker_batch_size)))
            for path in ("batches", "events"):
                rates[path].append(noop_faust_rate(settings, topics, total, path))
        raw = statistics.median(rates["raw"])
        print(f"no-op agent over {total:,} records (target >= {NOOP_TARGET:,}/s):")
        print(f"  {'raw aiokafka':<40} {raw:>9,.0f} records/s")
        for path, label in (("batches", "Faust, batch drain (streams.batching)"),
                            ("events", "Faust, its own per-record path")):
            rate = statistics.median(rates[path])
            print(f"  {label:<40} {rate:>9,.0f} records/s   ratio {rate / raw:.2f}")


if __name__ == "__main__":
    main()

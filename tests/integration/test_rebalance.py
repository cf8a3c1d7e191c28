"""Rebalances under load on the batch drain (streams.batching, ADR 0009): workers of
one group join, leave and are SIGKILLed while events flow. Every event is applied at
least once, none is skipped, and each aggregate's events are applied in order; the
duplicates (at-least-once: the stores are idempotent) are counted and reported.

The workers are real Faust workers (tests/integration/batch_worker.py) on the lane's
broker: Apache Kafka in lane 1, Tansu in lane 2."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from uuid import uuid4

import pytest
from confluent_kafka.admin import NewTopic

from infra.kafka import admin_client, producer
from infra.settings import Settings

pytestmark = pytest.mark.slow

PARTITIONS = 6
AGGREGATES = 48
RATE = 400  # events/s


class Feed:
    """Events `<aggregate> <seq>` keyed by aggregate, seq 1, 2, ... per aggregate."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.sent = 0
        self.stop = threading.Event()
        self.failed: list[str] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        p = producer(self.bootstrap, **{"linger.ms": 2})
        aggregates = [f"agg{i:02d}" for i in range(AGGREGATES)]
        seq, started = 0, time.monotonic()
        while not self.stop.is_set():
            seq += 1
            for aggregate in aggregates:
                p.produce(self.topic, f"{seq}".encode(), aggregate.encode(),
                          on_delivery=lambda err, _: err and self.failed.append(str(err)))
            self.sent = seq
            p.poll(0)
            time.sleep(max(0.0, started + seq * AGGREGATES / RATE - time.monotonic()))
        assert p.flush(30) == 0, "the feed could not deliver every event"


def read_logs(log_dir: Path) -> dict[str, list[tuple[int, int, int, str, int]]]:
    logs = {}
    for path in log_dir.glob("*.log"):
        logs[path.stem] = [(int(t), int(p), int(o), k, int(v)) for t, p, o, k, v in
                           (line.split() for line in path.read_text().splitlines())]
    return logs


def test_workers_joining_leaving_and_killed_apply_every_event_once_or_more_in_order(
        settings: Settings, tmp_path: Path) -> None:
    bootstrap = settings.require("kafka_bootstrap")
    topic, group = f"rebalance-{uuid4().hex[:8]}", f"rebalance-{uuid4().hex[:8]}"
    admin = admin_client(bootstrap)
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(15)
    workers: dict[str, subprocess.Popen] = {}

    def start(name: str) -> None:
        workers[name] = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.batch_worker", bootstrap, topic, group,
             str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    feed = Feed(bootstrap, topic)
    feed.thread.start()
    try:
        start("a")
        start("b")
        time.sleep(6)
        start("c")  # joins
        time.sleep(5)
        workers["b"].send_signal(signal.SIGTERM)  # leaves
        time.sleep(5)
        workers["a"].kill()  # crashes with a batch in hand
        time.sleep(3)
        start("d")  # joins while a's partitions wait out its session
        time.sleep(6)
        feed.stop.set()
        feed.thread.join(60)
        assert not feed.failed, feed.failed[:3]
        expected = {(f"agg{i:02d}", s) for i in range(AGGREGATES) for s in range(1, feed.sent + 1)}

        deadline = time.monotonic() + 120
        while True:
            logs = read_logs(tmp_path)
            applied = {(k, v) for lines in logs.values() for _, _, _, k, v in lines}
            if expected <= applied or time.monotonic() > deadline:
                break
            time.sleep(1)
    finally:
        feed.stop.set()
        for worker in workers.values():
            worker.terminate()
        for worker in workers.values():
            worker.wait(30)

    missing = expected - applied
    assert not missing, f"{len(missing)} events never applied, e.g. {sorted(missing)[:5]}"

    # In order: whenever any worker applies an aggregate's event, its predecessor has
    # already been applied (by that worker or another). A worker taking a partition
    # over starts at the committed offset, so its first event of a key can be late in
    # the sequence; it may never be ahead of what was applied.
    first_applied: dict[tuple[str, int], int] = {}
    for lines in logs.values():
        for at, _, _, key, seq in lines:
            first_applied[(key, seq)] = min(at, first_applied.get((key, seq), at))
    for name, lines in logs.items():
        for at, _, _, key, seq in lines:
            if seq > 1:
                assert first_applied[(key, seq - 1)] <= at, \
                    f"worker {name} applied {key} {seq} before anyone applied {seq - 1}"

    total = sum(len(lines) for lines in logs.values())
    by_worker = {name: len(lines) for name, lines in logs.items()}
    duplicates = total - len(expected)
    print(f"\nrebalance: {len(expected):,} events, {total:,} applications, "
          f"{duplicates:,} duplicates ({duplicates / len(expected):.1%}); per worker {by_worker}")
    assert len(logs) == 4, "every worker applied something"

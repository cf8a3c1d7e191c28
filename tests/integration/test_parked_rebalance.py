"""A worker that keeps its group's parked set between batches (ADR 0019) reads it again
when its partitions move: a partition it takes over may hold aggregates its last owner
parked, and the NOTIFY of that parking may not have reached it yet.

Two real `ringiflow projector workflow-projector` processes on the lane's broker
(Apache Kafka in lane 1, Tansu in lane 2). The NOTIFY still on its way is made to
last: the test disables the trigger that sends it, and the workers trust a kept set
for ten minutes, so only the re-read on a new assignment can see the parking."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest

import contract
from infra.kafka import producer
from infra.servers import free_port, stop_within
from infra.settings import Settings, libpq_url
from tests.conftest import settings_env
from tests.helpers import eventually
from tests.integration.test_streams import read_raw, workflow_rows
from tests.scenarios import build_world

pytestmark = pytest.mark.slow

GROUP = "workflow-projector"


def start(settings: Settings, name: str, tmp_path: Path,
          **env: str) -> tuple[subprocess.Popen, int, Path]:
    """One worker of the group with a data dir of its own (its Faust state)."""
    port = free_port()
    env = settings_env(settings) | {
        "RINGIFLOW_DATA_DIR": str(tmp_path / name),
        "RINGIFLOW_DB_ROLE_PASSWORD": settings.role_password or "",
        "RINGIFLOW_WORKER_SESSION_TIMEOUT_S": "6"} | env
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ringiflow", "projector", GROUP, "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    return process, port, log_path


@contextmanager
def projector(settings: Settings, name: str, tmp_path: Path) -> Iterator[str]:
    """A worker that trusts a kept parked set for ten minutes: only a forget() makes
    it read again. Yields its base URL once it has partitions."""
    process, port, log_path = start(settings, name, tmp_path,
                                    RINGIFLOW_WORKER_PARKED_KEEP_S="600")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while not ready(base):
            assert process.poll() is None, f"{name} exited: {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{name} never got partitions: " \
                                                f"{log_path.read_text()[-3000:]}"
            time.sleep(0.2)
        yield base
    finally:
        stop_within(process, name, 15)


def ready(base: str) -> bool:
    try:
        return httpx.get(base + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def send(bootstrap: str, envelopes: list[contract.EventEnvelope]) -> None:
    p = producer(bootstrap)
    for envelope in envelopes:
        record = contract.to_record(envelope)
        p.produce(record.topic, record.value, record.key, headers=list(record.headers))
    assert p.flush(30) == 0, "the broker did not take every event"


def parked_reads(base: str) -> float:
    """How often this worker has read the parked set from PostgreSQL (its /metrics)."""
    for line in httpx.get(base + "/metrics", timeout=5).text.splitlines():
        if line.startswith(f'ringiflow_parked_set_reads_total{{group="{GROUP}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("ringiflow_parked_set_reads_total is not on the worker's /metrics")


def test_a_worker_reads_the_parked_set_again_when_its_partitions_move(
        isolated: Settings, tmp_path: Path) -> None:
    asyncio.run(_scenario(isolated, tmp_path))


async def _scenario(settings: Settings, tmp_path: Path) -> None:
    bootstrap, admin = settings.require("kafka_bootstrap"), libpq_url(settings.database_url or "")
    world = build_world(workflows=24, seed=11)
    streams: dict[UUID, list[contract.EventEnvelope]] = {}
    for e in world.events:
        if e.aggregate_type.value == "workflow":
            streams.setdefault(e.aggregate_id, []).append(e)
    later = {w: events[1:] for w, events in streams.items() if len(events) > 1}
    control, *moved = later  # control: shows the stale set; moved: sent after the rebalance
    assert len(moved) >= 16, "enough aggregates that some stay on the first worker"
    firsts = [events[0] for events in streams.values()]
    others = [e for e in world.events if e.aggregate_type.value != "workflow"]

    with projector(settings, "a", tmp_path) as first:
        send(bootstrap, others + firsts)

        async def all_created() -> bool:
            rows = await workflow_rows(settings, world.tenant_id)
            return len(rows) == len(streams)

        await eventually(all_created, what="every workflow's first event applied")
        await asyncio.sleep(2)  # the LISTEN stands by now: the next read is kept
        warm = build_world(workflows=1, seed=12)
        send(bootstrap, warm.events)  # a batch that reads the parked set, and keeps it

        async def warm_applied() -> bool:
            return bool(await workflow_rows(settings, warm.tenant_id))

        await eventually(warm_applied, what="the warm-up workflow applied")

        # An earlier owner parks every one of these aggregates; its NOTIFY never comes.
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            await conn.execute("ALTER TABLE streams.parked_aggregates "
                               "DISABLE TRIGGER parked_aggregates_changed")
            for workflow_id in [control, *moved]:
                await conn.execute(
                    "INSERT INTO streams.parked_aggregates (consumer_group, aggregate_id, "
                    "tenant_id, aggregate_type, first_event_id, first_version, last_version, "
                    "error_class, error_message) VALUES (%s, %s, %s, 'workflow', %s, 2, 2, "
                    "'EarlierOwner', 'parked by the partition''s last owner')",
                    (GROUP, workflow_id, world.tenant_id, uuid4()))

        # The premise: with no NOTIFY and no move, the worker trusts what it kept.
        kept_reads = parked_reads(first)
        send(bootstrap, later[control])

        async def control_applied() -> bool:
            rows = await workflow_rows(settings, world.tenant_id)
            return rows[control] == later[control][-1].version

        await eventually(control_applied, what="the stand-in for a NOTIFY on its way did "
                                               "not hold: the worker read the parked set")

        assert parked_reads(first) == kept_reads, "it read the parked set: no premise"

        with projector(settings, "b", tmp_path):  # a second worker: partitions move
            send(bootstrap, [e for w in moved for e in later[w]])
            expected = {str(w).encode(): len(later[w]) for w in moved}

            async def all_dead_lettered() -> bool:
                rows = await workflow_rows(settings, world.tenant_id)
                applied = {w: rows[w] for w in moved if rows[w] != 1}
                assert not applied, f"events applied past an earlier owner's parking: {applied}"
                dlq = await read_raw(bootstrap, contract.dlq_topic(GROUP).name)
                counts: dict[bytes, int] = {}
                for record in dlq:
                    counts[record.key] = counts.get(record.key, 0) + 1
                return all(counts.get(k, 0) >= n for k, n in expected.items())

            await eventually(all_dead_lettered, within_s=90,
                             what="every later event of a parked aggregate dead-lettered "
                                  "behind its parking")
            assert parked_reads(first) > kept_reads, "the first worker never read it again"


def test_a_worker_whose_stores_cannot_be_opened_exits_so_it_is_restarted_afresh(
        isolated: Settings, tmp_path: Path) -> None:
    """It used to stay up with its agent crashing every few seconds on a closed pool,
    never ready, even after PostgreSQL could be reached again."""
    process, _, log_path = start(isolated, "locked-out", tmp_path,
                                 RINGIFLOW_DB_ROLE_PASSWORD="not-the-password")
    try:
        process.wait(90)
    finally:
        process.kill()
    log = log_path.read_text()
    assert "its stores could not be opened; check that PostgreSQL" in log, log[-3000:]
    assert "pool has already been opened/closed" not in log

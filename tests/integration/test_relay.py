"""The outbox relay against the real embedded broker, checked by reading the
topics with a consumer (not by reading the outbox)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import uuid4

import psycopg
import pytest
from aiokafka.partitioner import DefaultPartitioner

import contract
from commands.store import outbox_items
from infra import kafka
from infra.embedded import start_broker
from infra.servers import free_port
from infra.settings import Settings, libpq_url
from tests.conftest import TEST_JWT_SECRET, component, settings_env
from tests.events import (
    append,
    append_on,
    append_streams,
    comment_envelope,
    never_ahead,
    per_aggregate,
    read_topic,
    wait_all_published,
)
from tests.helpers import Tenant

TOPIC = contract.WORKFLOW_EVENTS.name
# The fault tests' backlog: the relay drains ~50k events/s, so a kill must land in a
# backlog large enough to be mid-drain (8,000 once finished before the kill did).
BACKLOG_STREAMS, BACKLOG_VERSIONS = 200, 100
BACKLOG = BACKLOG_STREAMS * BACKLOG_VERSIONS  # 20,000 events


def outbox_rows(database_url: str, where: str = "true") -> list[tuple]:
    with psycopg.connect(libpq_url(database_url)) as conn:
        return conn.execute(
            "SELECT aggregate_id, version, status, retry_count, last_error FROM "
            f"event_store.outbox_state WHERE {where} ORDER BY aggregate_id, version").fetchall()


def test_relay_publishes_every_event_in_order_with_headers_and_java_partitions(
    fresh_db: Settings,
) -> None:
    ids = append_streams(fresh_db.database_url or "", aggregates=40, versions=5)
    with component("relay", fresh_db, "RINGIFLOW_RELAY_PORT"):
        assert wait_all_published(fresh_db.database_url or "")["pending"] == 0
        expected = {e[0] for e in outbox_event_ids(fresh_db.database_url or "")}
        consumed = asyncio.run(read_topic(fresh_db.kafka_bootstrap or "", TOPIC, expected))
    mine = [c for c in consumed if c.envelope.aggregate_id in set(ids)]
    assert {c.envelope.event_id for c in mine} == expected
    partitions = list(range(contract.WORKFLOW_EVENTS.partitions))
    for c in mine:
        assert c.key == str(c.envelope.aggregate_id).encode()
        assert c.partition == DefaultPartitioner()(c.key, partitions, partitions)
        for header in ("event_id", "event_type", "aggregate_type", "version", "tenant_id",
                       "correlation_id", "traceparent"):
            assert header in c.headers, header
        assert c.headers["version"].decode() == str(c.envelope.version)
        # The bytes appended (ADR 0015), not a re-rendering of stored jsonb (", " and ": ").
        assert c.value == outbox_items([c.envelope]).wire[0]
    for aggregate, versions in per_aggregate(mine).items():
        assert versions == [1, 2, 3, 4, 5], (aggregate, versions)


def outbox_event_ids(database_url: str) -> list[tuple]:
    with psycopg.connect(libpq_url(database_url)) as conn:
        return conn.execute("SELECT event_id FROM event_store.outbox_state").fetchall()


def test_a_notification_wakes_the_relay_without_waiting_for_the_poll(
    fresh_db: Settings,
) -> None:
    with component("relay", fresh_db, "RINGIFLOW_RELAY_PORT",
                   RINGIFLOW_RELAY_POLL_INTERVAL_S="60") as base:
        time.sleep(1.5)  # idle, waiting on LISTEN
        started = time.monotonic()
        append_streams(fresh_db.database_url or "", aggregates=1, versions=1)
        assert wait_all_published(fresh_db.database_url or "", timeout_s=20)["pending"] == 0
        assert time.monotonic() - started < 20
        import httpx

        metrics = httpx.get(base + "/metrics").text
        assert "ringiflow_relay_published_total 1.0" in metrics
        assert "ringiflow_relay_commit_to_ack_seconds_count 1.0" in metrics


def test_a_command_wakes_the_relay_after_its_commit_without_waiting_for_the_poll(
    fresh_db: Settings,
) -> None:
    """The command API's appends leave the NOTIFY to its bell (ADR 0014): the relay
    still hears of each command at once, not on its next poll."""
    import httpx

    url = fresh_db.database_url or ""

    async def commands(api: str) -> None:
        async with httpx.AsyncClient(base_url=api, timeout=30) as client:
            tenant = await Tenant(client, TEST_JWT_SECRET, url).setup()
            assert wait_all_published(url, timeout_s=20)["pending"] == 0
            await tenant.create_workflow()

    with (component("command-api", fresh_db, "RINGIFLOW_COMMAND_API_PORT") as api,
          component("relay", fresh_db, "RINGIFLOW_RELAY_PORT",
                    RINGIFLOW_RELAY_POLL_INTERVAL_S="60")):
        time.sleep(1.5)  # the relay idle, waiting on LISTEN
        asyncio.run(commands(api))
        counts = wait_all_published(url, timeout_s=20)
    assert counts["pending"] == 0 and counts["published"] == 5, counts


@pytest.mark.slow
def test_two_relays_one_killed_mid_batch_never_reorder_an_aggregate(
    fresh_db: Settings,
) -> None:
    url = fresh_db.database_url or ""
    tenant = uuid4()  # one tenant: a stream is (tenant, aggregate id)
    ids = append_streams(url, aggregates=BACKLOG_STREAMS, versions=BACKLOG_VERSIONS,
                         tenant=tenant)
    env = settings_env(fresh_db) | {"RINGIFLOW_RELAY_BATCH_SIZE": "200",
                                    "RINGIFLOW_RELAY_REBALANCE_INTERVAL_S": "0.2"}
    relays = []
    for _ in range(2):
        env_one = env | {"RINGIFLOW_RELAY_PORT": str(free_port())}
        relays.append(subprocess.Popen([sys.executable, "-m", "ringiflow", "run", "relay"],
                                       env=env_one, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL))
    try:
        # Kill one relay while both are publishing (rows are still pending).
        deadline = time.monotonic() + 30
        while published_count(url) < 1500 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert published_count(url) < BACKLOG, "finished before the kill: raise the volume"
        relays[0].send_signal(signal.SIGKILL)
        append_streams(url, aggregates=BACKLOG_STREAMS, versions=5, tenant=tenant, ids=ids,
                       start=BACKLOG_VERSIONS + 1)
        assert wait_all_published(url, timeout_s=90)["pending"] == 0
        expected = {row[0] for row in outbox_event_ids(url)}
        consumed = asyncio.run(read_topic(fresh_db.kafka_bootstrap or "", TOPIC, expected))
    finally:
        for relay in relays:
            relay.kill()
            relay.wait()
    versions = per_aggregate([c for c in consumed if c.envelope.aggregate_id in set(ids)])
    assert len(versions) == BACKLOG_STREAMS
    for aggregate, seen in versions.items():
        assert set(seen) == set(range(1, BACKLOG_VERSIONS + 6)), aggregate
        assert never_ahead(seen), (aggregate, seen)


def published_count(database_url: str) -> int:
    with psycopg.connect(libpq_url(database_url)) as conn:
        row = conn.execute("SELECT count(*) FROM event_store.outbox_published").fetchone()
        return int(row[0]) if row else 0


def test_an_unpublishable_row_fails_and_holds_back_only_its_aggregate(
    fresh_db: Settings,
) -> None:
    url = fresh_db.database_url or ""
    tenant, stuck, free = uuid4(), uuid4(), uuid4()
    append(url, [comment_envelope(tenant, stuck, 1)])
    append(url, [comment_envelope(tenant, stuck, 2, filler=2_000_000)])  # > message.max.bytes
    append(url, [comment_envelope(tenant, stuck, 3), comment_envelope(tenant, free, 1)])
    with component("relay", fresh_db, "RINGIFLOW_RELAY_PORT", RINGIFLOW_RELAY_MAX_ATTEMPTS="2",
                   RINGIFLOW_RELAY_BACKOFF_S="0.05"):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if outbox_rows(url, "status = 'failed'"):
                break
            time.sleep(0.1)
        append(url, [comment_envelope(tenant, free, 2)])
        wait_until(lambda: len(outbox_rows(url, "status = 'published'")) == 3)
    rows = {(r[0], r[1]): r for r in outbox_rows(url)}
    assert rows[(stuck, 1)][2] == "published"
    assert rows[(stuck, 2)][2] == "failed" and rows[(stuck, 2)][3] == 2
    assert "MSG_SIZE_TOO_LARGE" in rows[(stuck, 2)][4]
    assert rows[(stuck, 3)][2] == "pending"  # held back behind v2, never overtakes it
    assert rows[(free, 1)][2] == rows[(free, 2)][2] == "published"

    status = subprocess.run([sys.executable, "-m", "ringiflow", "outbox", "status", "--json"],
                            env=settings_env(fresh_db), capture_output=True, text=True)
    assert status.returncode == 1  # failures make it alert-worthy
    report = json.loads(status.stdout)
    assert (report["failed"], report["pending"], report["blocked_aggregates"]) == (1, 1, 1)
    assert report["failed_rows"][0]["aggregate_id"] == str(stuck)


def wait_until(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_the_relay_survives_losing_its_database_sessions(fresh_db: Settings) -> None:
    url = fresh_db.database_url or ""
    with component("relay", fresh_db, "RINGIFLOW_RELAY_PORT"):
        append_streams(url, aggregates=5, versions=2)
        assert wait_all_published(url)["pending"] == 0
        with psycopg.connect(libpq_url(url), autocommit=True) as conn:
            killed = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE usename = 'ringiflow_relay' AND datname = current_database()").fetchone()
        assert killed and killed[0] >= 1
        ids = append_streams(url, aggregates=5, versions=2)
        assert wait_all_published(url, timeout_s=30)["pending"] == 0
    consumed = asyncio.run(read_topic(fresh_db.kafka_bootstrap or "", TOPIC,
                                      {row[0] for row in outbox_event_ids(url)}))
    for aggregate in ids:
        assert per_aggregate(consumed)[aggregate] == [1, 2]


def test_database_sessions_killed_mid_drain_lose_and_reorder_nothing(
        fresh_db: Settings) -> None:
    """Batch N+1 is produced while N is marked: killing the relay's sessions in
    that window (several times, through a backlog) may re-send, never skip or
    reorder."""
    url = fresh_db.database_url or ""
    tenant = uuid4()
    ids = append_streams(url, aggregates=BACKLOG_STREAMS, versions=BACKLOG_VERSIONS,
                         tenant=tenant)
    with component("relay", fresh_db, "RINGIFLOW_RELAY_PORT",
                   RINGIFLOW_RELAY_BATCH_SIZE="400"), \
            psycopg.connect(libpq_url(url), autocommit=True) as admin:
        kills = 0
        deadline = time.monotonic() + 60
        while kills < 4 and time.monotonic() < deadline:
            if published_count(url) >= 1000 * (kills + 1):
                row = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE usename = 'ringiflow_relay' AND datname = current_database()"
                ).fetchone()
                kills += bool(row and row[0])
            time.sleep(0.005)
        assert kills >= 2 and published_count(url) < BACKLOG, "drained before the kills"
        assert wait_all_published(url, timeout_s=90)["pending"] == 0
    consumed = asyncio.run(read_topic(fresh_db.kafka_bootstrap or "", TOPIC,
                                      {row[0] for row in outbox_event_ids(url)}))
    versions = per_aggregate([c for c in consumed if c.envelope.aggregate_id in set(ids)])
    assert len(versions) == BACKLOG_STREAMS
    for aggregate, seen in versions.items():
        assert set(seen) == set(range(1, BACKLOG_VERSIONS + 1)), aggregate
        assert never_ahead(seen), (aggregate, seen)


@pytest.mark.slow
def test_a_broker_that_comes_back_empty_is_refilled_in_version_order(
    fresh_db: Settings, tmp_path: Path,
) -> None:
    """Tansu forgets everything on a restart; an Apache Kafka whose data dir is lost
    does too. Either way the relay must notice before it publishes the backlog,
    and re-publish every aggregate's history ahead of it: on the topic, no version
    may first appear after a higher one (README: order whatever happens)."""
    import shutil

    import httpx

    port = free_port()
    broker = start_broker(fresh_db, tmp_path, port)
    bootstrap = broker.url
    kafka.ensure_topics(bootstrap)
    isolated = fresh_db.model_copy(update={"kafka_bootstrap": bootstrap})
    url = isolated.database_url or ""
    try:
        with component("relay", isolated, "RINGIFLOW_RELAY_PORT",
                       RINGIFLOW_RELAY_MESSAGE_TIMEOUT_MS="2000", RINGIFLOW_RELAY_BACKOFF_S="0.1",
                       RINGIFLOW_RELAY_MAX_BACKOFF_S="1",
                       RINGIFLOW_RELAY_HISTORY_CHECK_INTERVAL_S="1") as relay:
            tenant = uuid4()  # one tenant: a stream is (tenant, aggregate id)
            before = append_streams(url, aggregates=20, versions=3, tenant=tenant)
            assert wait_all_published(url)["pending"] == 0
            time.sleep(1.5)  # the relay's marks reach the database
            broker.stop()
            shutil.rmtree(tmp_path / "kafka", ignore_errors=True)  # the broker's data is gone
            during = append_streams(url, aggregates=10, versions=2)  # broker down: they wait
            # The relay says it cannot publish, rather than staying green.
            wait_until(lambda: httpx.get(relay + "/readyz", timeout=5).status_code == 503, 30)
            more = append_streams(url, aggregates=0, versions=2, start=4, tenant=tenant,
                                  ids=before[:5])
            assert wait_all_published(url, timeout_s=1)["pending"] == 30
            broker = start_broker(fresh_db, tmp_path, port)
            # The relay recreates the topics, re-queues what the broker lost, drains.
            assert wait_all_published(url, timeout_s=90)["pending"] == 0, \
                outbox_rows(url, "status = 'pending'")[:3]
            wait_until(lambda: httpx.get(relay + "/readyz", timeout=5).status_code == 200, 30)
            assert "ringiflow_relay_history_losses_total 1.0" in \
                httpx.get(relay + "/metrics").text
        expected = {row[0] for row in outbox_event_ids(url)}
        consumed = asyncio.run(read_topic(bootstrap, TOPIC, expected))
        # Nothing left for an operator's reconcile to find.
        result = subprocess.run(
            [sys.executable, "-m", "ringiflow", "outbox", "reconcile", "--dry-run", "--json"],
            env=settings_env(isolated), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr + result.stdout
        assert {r["topic"]: r for r in json.loads(result.stdout)}[TOPIC]["missing"] == 0
    finally:
        broker.stop()
    assert more == before[:5]
    versions = per_aggregate(consumed)
    for aggregate in before:
        assert set(versions[aggregate]) == ({1, 2, 3, 4, 5} if aggregate in more
                                            else {1, 2, 3})
    for aggregate in during:
        assert set(versions[aggregate]) == {1, 2}
    out_of_order = {a: v for a, v in versions.items() if not never_ahead(v)}
    assert out_of_order == {}


def test_an_event_committed_while_reconcile_runs_goes_out_after_the_requeued_tail(
    fresh_db: Settings,
) -> None:
    """Reconcile re-queues an aggregate's tail while a command's append of the
    next version is still open: the append must end up behind the tail, not
    ahead of it (and never deleted)."""
    url = fresh_db.database_url or ""
    tenant, aggregate = uuid4(), uuid4()
    append_streams(url, aggregates=1, versions=3, tenant=tenant, ids=[aggregate])
    envelope = comment_envelope(tenant, aggregate, 4)
    with psycopg.connect(libpq_url(url)) as open_append:  # a transaction, left open
        append_on(open_append, [envelope])
        reconciling = subprocess.Popen(
            [sys.executable, "-m", "ringiflow", "outbox", "reconcile", "--json"],
            env=settings_env(fresh_db), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        time.sleep(3)  # reconcile has read the topic and the events by now
        open_append.commit()
    out, err = reconciling.communicate(timeout=60)
    assert reconciling.returncode == 0, err + out
    with psycopg.connect(libpq_url(url)) as conn:
        queued = [v for (v,) in conn.execute(
            "SELECT version FROM event_store.outbox WHERE aggregate_id = %s ORDER BY id",
            (aggregate,)).fetchall()]
    assert queued == [1, 2, 3, 4]  # id order is publish order
    with component("relay", fresh_db, "RINGIFLOW_RELAY_PORT"):
        assert wait_all_published(url)["pending"] == 0
    consumed = asyncio.run(read_topic(fresh_db.kafka_bootstrap or "", TOPIC,
                                      {row[0] for row in outbox_event_ids(url)}))
    assert per_aggregate(consumed)[aggregate] == [1, 2, 3, 4]


@pytest.mark.slow
def test_reconcile_under_load_loses_nothing_and_keeps_order(fresh_db: Settings) -> None:
    """The fault probe's reproduction: commands keep committing while reconcile
    runs, again and again, with the relay publishing meanwhile."""
    import random
    import threading

    url = fresh_db.database_url or ""
    tenant = uuid4()
    aggregates = {uuid4(): 0 for _ in range(12)}
    stop = threading.Event()
    rng = random.Random(12)

    def load() -> None:
        while not stop.is_set():
            aggregate = rng.choice(list(aggregates))
            aggregates[aggregate] += 1
            append(url, [comment_envelope(tenant, aggregate, aggregates[aggregate])])

    with component("relay", fresh_db, "RINGIFLOW_RELAY_PORT"):
        loader = threading.Thread(target=load)
        loader.start()
        try:
            for _ in range(4):
                result = subprocess.run(
                    [sys.executable, "-m", "ringiflow", "outbox", "reconcile", "--json"],
                    env=settings_env(fresh_db), capture_output=True, text=True, timeout=120)
                assert result.returncode == 0, result.stderr + result.stdout
        finally:
            stop.set()
            loader.join()
        assert wait_all_published(url)["pending"] == 0
    consumed = asyncio.run(read_topic(fresh_db.kafka_bootstrap or "", TOPIC,
                                      {row[0] for row in outbox_event_ids(url)}))
    versions = per_aggregate(consumed)
    for aggregate, last in aggregates.items():
        assert set(versions[aggregate]) == set(range(1, last + 1)), aggregate
        assert never_ahead(versions[aggregate]), versions[aggregate]


def test_cleanup_deletes_only_old_published_rows(fresh_db: Settings) -> None:
    url = fresh_db.database_url or ""
    append_streams(url, aggregates=3, versions=2)
    with component("relay", fresh_db, "RINGIFLOW_RELAY_PORT"):
        assert wait_all_published(url)["pending"] == 0
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("UPDATE event_store.outbox_published "
                     "SET published_at = now() - interval '8 days' WHERE version = 1")
    result = subprocess.run([sys.executable, "-m", "ringiflow", "outbox", "cleanup"],
                            env=settings_env(fresh_db), capture_output=True, text=True)
    assert result.returncode == 0 and "deleted 3" in result.stdout
    assert [r[1] for r in outbox_rows(url)] == [2, 2, 2]


def test_relays_of_another_database_on_the_server_do_not_take_a_share(
    fresh_db: Settings, settings: Settings,
) -> None:
    import httpx

    from relay.lanes import LANES, MEMBERSHIP, NAMESPACE

    with psycopg.connect(libpq_url(settings.database_url or ""), autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock_shared(%s, %s)", (NAMESPACE, MEMBERSHIP))
        with component("relay", fresh_db, "RINGIFLOW_RELAY_PORT") as base:
            wait_until(lambda: f"ringiflow_relay_lanes_owned {LANES}.0" in
                       httpx.get(base + "/metrics").text, timeout_s=20)

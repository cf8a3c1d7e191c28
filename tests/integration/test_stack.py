"""Smoke tests: each of the four embedded servers written to and read from
through the project's own client code, and the schema's guarantees."""

from __future__ import annotations

import asyncio
import json
from uuid import UUID, uuid4

import psycopg
import pytest
from aiokafka.partitioner import DefaultPartitioner
from psycopg import errors
from psycopg.types.json import Jsonb

import contract
from infra import db, kafka
from infra.clients import (
    opensearch_client,
    readiness_checks,
    redis_client,
    run_checks,
)
from infra.settings import Settings, libpq_url
from tests.events import append, comment_envelope
from tests.unit.test_contract import envelope

INSERT_EVENT = """
INSERT INTO event_store.events (event_id, tenant_id, aggregate_type, aggregate_id, version,
    event_type, occurred_at, payload, aggregate, metadata)
VALUES (%s, %s, 'workflow', %s, %s, 'WorkflowCreated', now(), '{}', '{}', '{}')
"""


def role_conn(settings: Settings, role: str) -> psycopg.Connection:
    return psycopg.connect(libpq_url(settings.role_database_url(role)))


def set_tenant(conn: psycopg.Connection, tenant: object) -> None:
    conn.execute("SELECT set_config('ringiflow.tenant_id', %s, true)", (str(tenant),))


def test_postgres_events_are_tenant_scoped_and_append_only(settings: Settings) -> None:
    tenant, other, aggregate = uuid4(), uuid4(), uuid4()
    with role_conn(settings, "command") as conn:
        set_tenant(conn, tenant)
        conn.execute(INSERT_EVENT, (uuid4(), tenant, aggregate, 1))
        conn.commit()
        set_tenant(conn, tenant)
        assert conn.execute("SELECT count(*) FROM event_store.events WHERE aggregate_id = %s",
                            (aggregate,)).fetchone() == (1,)
        conn.commit()
        set_tenant(conn, other)  # another tenant guessing the id sees nothing
        assert conn.execute("SELECT count(*) FROM event_store.events WHERE aggregate_id = %s",
                            (aggregate,)).fetchone() == (0,)
        conn.commit()
        # No tenant set: isolation fails closed.
        assert conn.execute("SELECT count(*) FROM event_store.events").fetchone() == (0,)
        conn.commit()
        set_tenant(conn, tenant)
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("UPDATE event_store.events SET version = 2 WHERE aggregate_id = %s",
                         (aggregate,))
        conn.rollback()
        set_tenant(conn, other)
        with pytest.raises(errors.InsufficientPrivilege):  # RLS WITH CHECK
            conn.execute(INSERT_EVENT, (uuid4(), tenant, uuid4(), 1))
        conn.rollback()


def test_even_the_owner_cannot_rewrite_history(settings: Settings) -> None:
    tenant, aggregate = uuid4(), uuid4()
    with psycopg.connect(libpq_url(settings.database_url or "")) as conn:
        conn.execute(INSERT_EVENT, (uuid4(), tenant, aggregate, 1))
        conn.commit()
        with pytest.raises(errors.InsufficientPrivilege, match="append-only"):
            conn.execute("DELETE FROM event_store.events WHERE aggregate_id = %s", (aggregate,))
        conn.rollback()


def test_version_is_unique_per_aggregate(settings: Settings) -> None:
    tenant, aggregate = uuid4(), uuid4()
    with role_conn(settings, "command") as conn:
        set_tenant(conn, tenant)
        conn.execute(INSERT_EVENT, (uuid4(), tenant, aggregate, 1))
        with pytest.raises(errors.UniqueViolation):
            conn.execute(INSERT_EVENT, (uuid4(), tenant, aggregate, 1))
        conn.rollback()


def test_the_outbox_keeps_the_appended_bytes_and_the_events_table_their_columns(
    settings: Settings,
) -> None:
    """ADR 0015: the record value the relay sends is the bytes the writer appended,
    not a re-rendering of stored jsonb; the event's columns come from those bytes."""
    from commands.store import outbox_items
    from tests.events import append_on, comment_envelope

    tenant, aggregate = uuid4(), uuid4()
    envelopes = [comment_envelope(tenant, aggregate, v) for v in (1, 2)]
    with psycopg.connect(libpq_url(settings.database_url or ""), autocommit=True) as conn:
        append_on(conn, envelopes)
        outbox = conn.execute("SELECT payload FROM event_store.outbox WHERE aggregate_id = %s "
                              "ORDER BY id", (aggregate,)).fetchall()
        events = conn.execute("SELECT event_id, version, payload, metadata FROM "
                              "event_store.events WHERE aggregate_id = %s ORDER BY position",
                              (aggregate,)).fetchall()
    assert [row[0] for row in outbox] == outbox_items(envelopes).wire
    assert [(e[0], e[1], e[2], e[3]["trace_id"]) for e in events] == [
        (e.event_id, e.version, e.payload, e.metadata.trace_id) for e in envelopes]


def test_an_append_with_more_envelopes_than_outbox_items_is_refused_whole(
    settings: Settings,
) -> None:
    from commands.store import outbox_items
    from tests.events import comment_envelope

    tenant, aggregate = uuid4(), uuid4()
    targets, wire = outbox_items([comment_envelope(tenant, aggregate, v) for v in (1, 2)])
    with psycopg.connect(libpq_url(settings.database_url or ""), autocommit=True) as conn:
        with pytest.raises(errors.InvalidParameterValue, match="2 envelopes but 1 outbox items"):
            conn.execute("SELECT event_store.append_events(%s, %s, %s)",
                         (tenant, Jsonb(targets.obj[:1]), wire))
        assert conn.execute("SELECT count(*) FROM event_store.events WHERE aggregate_id = %s",
                            (aggregate,)).fetchone() == (0,)


def test_query_role_cannot_write_and_projector_cannot_touch_events(settings: Settings) -> None:
    tenant = uuid4()
    with role_conn(settings, "query") as conn:
        set_tenant(conn, tenant)
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("INSERT INTO read_model.users VALUES (%s, %s, 'a', 'a@x', 1)",
                         (uuid4(), tenant))
        conn.rollback()
    with role_conn(settings, "projector") as conn:
        set_tenant(conn, tenant)
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute(INSERT_EVENT, (uuid4(), tenant, uuid4(), 1))
        conn.rollback()
        set_tenant(conn, tenant)
        conn.execute("INSERT INTO read_model.users VALUES (%s, %s, 'a', 'a@x', 1)",
                     (uuid4(), tenant))
        conn.rollback()


def test_read_model_views_keep_row_level_security(settings: Settings) -> None:
    """read_model.* are views over the live version (ADR 0005); they must not
    bypass the tables' tenant isolation for readers or writers."""
    tenant, other, user = uuid4(), uuid4(), uuid4()
    with role_conn(settings, "projector") as conn:
        set_tenant(conn, tenant)
        conn.execute("INSERT INTO read_model.users VALUES (%s, %s, 'a', 'a@x', 1)",
                     (user, tenant))
        with pytest.raises(errors.InsufficientPrivilege):  # another tenant's row
            conn.execute("INSERT INTO read_model.users VALUES (%s, %s, 'b', 'b@x', 1)",
                         (uuid4(), other))
        conn.rollback()
        set_tenant(conn, tenant)
        conn.execute("INSERT INTO read_model.users VALUES (%s, %s, 'a', 'a@x', 1)",
                     (user, tenant))
        conn.commit()
    with role_conn(settings, "query") as conn:
        set_tenant(conn, other)
        assert conn.execute("SELECT count(*) FROM read_model.users WHERE id = %s",
                            (user,)).fetchone() == (0,)
        set_tenant(conn, tenant)
        assert conn.execute("SELECT count(*) FROM read_model.users WHERE id = %s",
                            (user,)).fetchone() == (1,)


def test_migrations_are_idempotent(settings: Settings) -> None:
    url = settings.database_url or ""
    db.migrate(url)
    assert db.current_revision(url) == db.head_revision() == "0016"


def test_ordinary_events_are_stored_uncompressed_and_large_ones_compressed(
        settings: Settings) -> None:
    """Migration 0016: compressing every ~2 kB row was an eighth of the server's CPU
    on the append path."""
    url, tenant = settings.database_url or "", uuid4()
    ordinary, large = uuid4(), uuid4()
    append(url, [comment_envelope(tenant, ordinary, 1, filler=3000)])
    append(url, [comment_envelope(tenant, large, 1, filler=9000)])
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        stored = dict(conn.execute(
            "SELECT e.aggregate_id, (pg_column_compression(e.payload), "
            "pg_column_compression(o.payload)) FROM event_store.events e "
            "JOIN event_store.outbox o USING (event_id) WHERE e.aggregate_id = ANY(%s)",
            ([ordinary, large],)).fetchall())
    assert stored == {ordinary: (None, None), large: ("pglz", "pglz")}


async def test_redis_round_trip(settings: Settings) -> None:
    client = redis_client(settings.redis_url or "")
    try:
        key = f"smoke:{uuid4()}"
        await client.set(key, "値", ex=60)
        assert (await client.get(key)).decode() == "値"
    finally:
        await client.aclose()


async def test_opensearch_round_trip_with_japanese_analysis(settings: Settings) -> None:
    client = opensearch_client(settings.opensearch_url or "")
    index = f"smoke-{uuid4().hex}"
    try:
        await client.indices.create(index=index, body={"mappings": {"properties": {
            "title": {"type": "text", "analyzer": "kuromoji"}}}})
        await client.index(index=index, id="1", body={"title": "東京都の経費精算"},
                           refresh=True, version=3, version_type="external")
        found = await client.search(index=index, body={"query": {"match": {"title": "東京"}}})
        assert found["hits"]["total"]["value"] == 1
        doc = await client.get(index=index, id="1")
        assert doc["_version"] == 3
    finally:
        await client.indices.delete(index=index)
        await client.close()


async def test_kafka_produce_and_consume_with_java_compatible_partitioning(
    settings: Settings,
) -> None:
    bootstrap = settings.kafka_bootstrap or ""
    topic = contract.WORKFLOW_EVENTS.name
    events = [envelope() for _ in range(20)]
    producer = kafka.producer(bootstrap)
    delivered: dict[bytes, int] = {}

    def on_delivery(err: object, msg: object) -> None:
        assert err is None, err
        delivered[msg.key()] = msg.partition()  # type: ignore[attr-defined]

    for event in events:
        record = contract.to_record(event)
        producer.produce(record.topic, record.value, record.key, headers=list(record.headers),
                         on_delivery=on_delivery)
    assert producer.flush(10) == 0
    partitioner = DefaultPartitioner()
    partitions = list(range(contract.WORKFLOW_EVENTS.partitions))
    for key, partition in delivered.items():
        assert partition == partitioner(key, partitions, partitions), "not murmur2"

    consumer = kafka.record_consumer(bootstrap, topic)
    wanted = {e.event_id for e in events}
    seen: set = set()
    await consumer.start()
    try:
        async with asyncio.timeout(30):
            while not wanted <= seen:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    for msg in records:
                        seen.add(contract.decode_envelope(msg.value).event_id)
    finally:
        await consumer.stop()


async def test_readiness_reports_every_dependency(settings: Settings) -> None:
    results = await run_checks(readiness_checks(settings, "query", "kafka", "redis",
                                                "opensearch"))
    assert results == {"postgres": "ok", "kafka": "ok", "redis": "ok", "opensearch": "ok"}


async def test_readiness_names_an_unreachable_dependency(settings: Settings) -> None:
    broken = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    results = await run_checks(readiness_checks(broken, None, "redis"), limit_s=3)
    assert results["redis"].startswith("unreachable"), json.dumps(results)


def test_migration_0007_keys_existing_streams_and_read_models_by_tenant(
        settings: Settings) -> None:
    """An installation at 0006, with data and a rebuilt read-model version, upgrades
    in place: its rows stay, and afterwards a second tenant may hold the same id."""
    import orjson

    name = f"m_{uuid4().hex[:8]}"
    admin = libpq_url(settings.database_url or "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = (settings.database_url or "").rsplit("/", 1)[0] + f"/{name}"
    try:
        db.migrate(url, revision="0006")
        shared, first, second = uuid4(), uuid4(), uuid4()

        def append(conn: psycopg.Connection, tenant: UUID) -> None:
            event = {"event_id": str(uuid4()), "aggregate_type": "user",
                     "aggregate_id": str(shared), "version": 1, "event_type": "UserRegistered",
                     "schema_version": 1, "occurred_at": "2026-12-01T00:00:00Z",
                     "payload": {}, "aggregate": {}, "metadata": {}}
            target = {"topic": "ringiflow.user.events", "headers": {}}
            if db.current_revision(url) < "0012":  # the envelope inside each item
                conn.execute("SELECT event_store.append_events(%s, %s::jsonb)",
                             (tenant, orjson.dumps([{"envelope": event, **target}]).decode()))
            else:  # its bytes beside them (ADR 0015)
                conn.execute("SELECT event_store.append_events(%s, %s::jsonb, %s)",
                             (tenant, orjson.dumps([target]).decode(), [orjson.dumps(event)]))

        with psycopg.connect(libpq_url(url), autocommit=True) as conn:
            append(conn, first)
            with pytest.raises(psycopg.errors.UniqueViolation):
                append(conn, second)  # before: ids were unique across tenants
            conn.execute("CREATE SCHEMA read_model_v2")
            conn.execute("CREATE TABLE read_model_v2.users "
                         "(LIKE read_model_v1.users INCLUDING ALL)")
            for table in ("workflow_read_models", "workflow_steps", "my_tasks", "definitions"):
                conn.execute(f"CREATE TABLE read_model_v2.{table} "
                             f"(LIKE read_model_v1.{table} INCLUDING ALL)")
        db.migrate(url)
        with psycopg.connect(libpq_url(url), autocommit=True) as conn:
            append(conn, second)  # after: the same id in another tenant
            assert conn.execute("SELECT count(*) FROM event_store.events WHERE aggregate_id = %s",
                                (shared,)).fetchone() == (2,)
            with pytest.raises(psycopg.errors.UniqueViolation):
                append(conn, second)  # still one stream per tenant and id
            keys = dict(conn.execute(
                "SELECT conrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE contype = 'p' AND conrelid::regclass::text ~ '^read_model_v[12][.]users$'"
            ).fetchall())
        assert keys == {"read_model_v1.users": "PRIMARY KEY (tenant_id, id)",
                        "read_model_v2.users": "PRIMARY KEY (tenant_id, id)"}
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')

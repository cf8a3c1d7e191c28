"""The embedded Apache Kafka and OpenSearch: which one runs and why, the bad
inputs a new user meets (no JVM, a wrong Java, no Maven, Maven Central out of
reach, a port in use, storage of another cluster), and durability across
restarts. Real servers, real JVMs; the only stand-in is a fake `java` that
reports Java 11, a version this machine does not have."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from uuid import UUID

import pytest

from infra import jvm, kafka_broker, opensearch_node
from infra.embedded import choose_kafka, choose_opensearch, start_broker
from infra.kafka import ensure_topics, producer, read_from_start
from infra.servers import EmbeddedError, free_port
from infra.settings import Settings
from tests.helpers import up_fails_fast

# Whatever the test lane chose, these tests choose for themselves.
AUTO = {"embedded_kafka": "auto", "embedded_opensearch": "auto"}
STAND_INS = {"RINGIFLOW_EMBEDDED_KAFKA": "tansu", "RINGIFLOW_EMBEDDED_OPENSEARCH": "osmem"}
# Tests that start Apache Kafka or OpenSearch themselves: not again in the stand-in lane.
needs_java17 = pytest.mark.skipif(
    jvm.find_jvm(None, 17) is None or os.environ.get("RINGIFLOW_EMBEDDED_KAFKA") == "tansu",
    reason="no Java >= 17 here, or the stand-in lane (the Apache Kafka lane runs it)")


def fake_java(folder: Path, version: str) -> Path:
    """A JAVA_HOME whose `java -version` reports `version` (a JVM we cannot install)."""
    (folder / "bin").mkdir(parents=True)
    java = folder / "bin" / "java"
    java.write_text(f"#!/bin/sh\necho 'openjdk version \"{version}\" 2024-01-16' >&2\n")
    java.chmod(0o755)
    return folder


# --- which server runs, and why ----------------------------------------------------


def test_auto_without_a_jvm_runs_the_stand_ins_and_says_why(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, java_home=tmp_path / "no-jvm", **AUTO)
    kafka, search = choose_kafka(settings), choose_opensearch(settings)
    assert (kafka.kind, search.kind) == ("tansu", "osmem")
    assert "no Java >= 17" in kafka.reason and str(tmp_path / "no-jvm") in kafka.reason
    assert "auto" in search.reason


@needs_java17
def test_auto_with_java_17_runs_apache_kafka(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, java_home=jvm.find_jvm(None, 17).home, **AUTO)
    choice = choose_kafka(settings)
    assert choice.kind == "apache", choice.reason
    assert "Java 17" in choice.reason


def test_auto_with_java_17_and_nothing_newer_runs_opensearch_2(tmp_path: Path) -> None:
    java17 = jvm.find_jvm(None, 17)
    if java17 is None or java17.major != 17:
        pytest.skip("no Java 17 here")
    settings = Settings(data_dir=tmp_path, java_home=java17.home, **AUTO)
    choice = choose_opensearch(settings)
    assert choice.kind in ("opensearch", "osmem"), choice.reason
    if choice.kind == "opensearch":
        assert choice.label == "OpenSearch 2.19.6"


# --- bad input: each fails fast, naming the setting and what to do -------------------


def test_apache_without_a_jvm_fails_fast(cli_env: dict[str, str], tmp_path: Path) -> None:
    cli_env |= STAND_INS | {"RINGIFLOW_EMBEDDED_KAFKA": "apache",
                            "RINGIFLOW_JAVA_HOME": str(tmp_path / "no-jvm")}
    up_fails_fast(cli_env, "RINGIFLOW_JAVA_HOME", "Java >= 17", "RINGIFLOW_EMBEDDED_KAFKA=tansu",
             limit_s=20)


@pytest.mark.parametrize(("setting", "value", "fallback"), [
    ("RINGIFLOW_EMBEDDED_KAFKA", "apache", "RINGIFLOW_EMBEDDED_KAFKA=tansu"),
    ("RINGIFLOW_EMBEDDED_OPENSEARCH", "opensearch", "RINGIFLOW_EMBEDDED_OPENSEARCH=osmem"),
])
def test_a_too_old_java_fails_fast(cli_env: dict[str, str], tmp_path: Path, setting: str,
                                   value: str, fallback: str) -> None:
    cli_env |= STAND_INS | {setting: value,
                            "RINGIFLOW_JAVA_HOME": str(fake_java(tmp_path / "j", "11.0.22"))}
    up_fails_fast(cli_env, "Java 11.0.22", "RINGIFLOW_JAVA_HOME", fallback, limit_s=20)


def test_an_unknown_server_kind_is_refused(cli_env: dict[str, str]) -> None:
    cli_env["RINGIFLOW_EMBEDDED_KAFKA"] = "confluent"
    up_fails_fast(cli_env, "RINGIFLOW_EMBEDDED_KAFKA='confluent' is not one of auto, apache, tansu",
             limit_s=20)


def test_no_maven_and_nothing_cached_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(jvm.JvmError) as error:
        kafka_broker.libs(tmp_path / "cache", None)
    message = str(error.value)
    assert "Maven (`mvn`) is not on PATH" in message
    assert "RINGIFLOW_EMBEDDED_KAFKA=tansu" in message
    assert not kafka_broker.is_cached(tmp_path / "cache")


@needs_java17
@pytest.mark.skipif(jvm.maven() is None, reason="no Maven here")
def test_maven_central_out_of_reach_fails_fast(cli_env: dict[str, str], tmp_path: Path) -> None:
    mirror = tmp_path / "settings.xml"
    mirror.write_text(
        "<settings><mirrors><mirror><id>down</id><mirrorOf>*</mirrorOf>"
        f"<url>http://127.0.0.1:{free_port()}/maven2</url></mirror></mirrors></settings>")
    cli_env |= STAND_INS | {"RINGIFLOW_EMBEDDED_KAFKA": "apache",
                "RINGIFLOW_CACHE_DIR": str(tmp_path / "empty-cache"),
                "RINGIFLOW_MAVEN_SETTINGS": str(mirror)}
    stderr = up_fails_fast(cli_env, "Maven could not fetch Apache Kafka",
                           "RINGIFLOW_MAVEN_SETTINGS", "RINGIFLOW_EMBEDDED_KAFKA=tansu", limit_s=90)
    assert "Connection refused" in stderr or "Could not transfer" in stderr, stderr
    # Nothing half-fetched is taken for a cache the next time.
    assert not kafka_broker.is_cached(tmp_path / "empty-cache")


@needs_java17
def test_storage_of_another_cluster_fails_fast(tmp_path: Path, settings: Settings) -> None:
    runtime = jvm.find_jvm(None, 17)
    assert runtime is not None
    classpath = kafka_broker.libs(settings.cache_dir, settings.maven_settings)
    home = tmp_path / "kafka"
    home.mkdir()
    config = home / "server.properties"
    log_dir = home / "data"
    config.write_text(kafka_broker.server_properties(log_dir, free_port(), free_port()))
    formatted = kafka_broker.format_storage(runtime, classpath, config, log_dir, None)
    started = time.monotonic()
    with pytest.raises(EmbeddedError) as error:
        kafka_broker.start_apache_kafka(tmp_path, free_port(), 30, runtime, settings.cache_dir,
                                        cluster_id="AAAAAAAAAAAAAAAAAAAAAA")
    assert time.monotonic() - started < 10
    message = str(error.value)
    assert f"formatted for cluster {formatted}" in message
    assert "RINGIFLOW_KAFKA_CLUSTER_ID" in message and "--data-dir" in message


# --- durability ---------------------------------------------------------------------


@needs_java17
@pytest.mark.slow
def test_apache_kafka_keeps_records_and_committed_offsets_across_a_restart(
    tmp_path: Path, settings: Settings,
) -> None:
    apache = settings.model_copy(update={"embedded_kafka": "apache"})
    port = free_port()
    broker = start_broker(apache, tmp_path, port)
    try:
        ensure_topics(broker.url)
        sender = producer(broker.url)
        for i in range(500):
            sender.produce("ringiflow.workflow.events", key=f"k{i % 7}", value=str(i))
        assert sender.flush(30) == 0
        asyncio.run(_commit(broker.url, "durability-check", 300))
    finally:
        broker.stop()
    broker = start_broker(apache, tmp_path, port)
    try:
        records = asyncio.run(read_from_start(broker.url, "ringiflow.workflow.events"))
        assert sorted(int(r.value) for r in records) == list(range(500))
        assert asyncio.run(_resume(broker.url, "durability-check")) == 200
    finally:
        broker.stop()


async def _commit(bootstrap: str, group: str, count: int) -> None:
    from infra.kafka import record_consumer, stop_consumer

    consumer = record_consumer(bootstrap, "ringiflow.workflow.events", group_id=group)
    await consumer.start()
    try:
        seen = 0
        while seen < count:
            for tp, messages in (await consumer.getmany(timeout_ms=1000,
                                                        max_records=count - seen)).items():
                seen += len(messages)
                await consumer.commit({tp: messages[-1].offset + 1})
    finally:
        await stop_consumer(consumer)


async def _resume(bootstrap: str, group: str) -> int:
    """How many records the group still had to read: the rest after its commits."""
    from infra.kafka import record_consumer, stop_consumer

    consumer = record_consumer(bootstrap, "ringiflow.workflow.events", group_id=group)
    await consumer.start()
    try:
        seen, idle = 0, 0
        while idle < 3:
            batch = await consumer.getmany(timeout_ms=1000)
            seen += sum(len(m) for m in batch.values())
            idle = 0 if batch else idle + 1
        return seen
    finally:
        await stop_consumer(consumer)


@needs_java17
@pytest.mark.slow
@pytest.mark.parametrize("version", ["3.8.0", "2.19.6"])
def test_opensearch_analyses_japanese_and_takes_the_indexers_index(
    tmp_path: Path, settings: Settings, version: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both embedded distributions: kuromoji tokenizes, the indexer's own index (with
    its kuromoji analyzer) is created behind its alias, a stale external version is
    refused. The node compiles with C1 only, and OPENSEARCH_JAVA_OPTS comes after
    that flag, so a user's choice wins (ADR 0006)."""
    monkeypatch.setenv("OPENSEARCH_JAVA_OPTS", "-XX:TieredStopAtLevel=4")
    from opensearchpy import AsyncOpenSearch
    from opensearchpy.exceptions import ConflictError

    from infra.embedded import start_opensearch
    from projectors.search.store import ensure_index

    real = settings.model_copy(update={"embedded_opensearch": "opensearch",
                                       "embedded_opensearch_version": version})
    try:
        choice = choose_opensearch(real)
    except EmbeddedError as exc:
        pytest.skip(str(exc))
    server = start_opensearch(real, choice, tmp_path, free_port())

    async def check() -> None:
        client = AsyncOpenSearch(hosts=[server.url])
        try:
            tokens = await client.indices.analyze(
                body={"analyzer": "kuromoji", "text": "稟議書の承認依頼"})
            assert [t["token"] for t in tokens["tokens"]] == ["稟議", "書", "承認", "依頼"]
            node = next(iter((await client.nodes.info(metric="jvm"))["nodes"].values()))
            flags = [a for a in node["jvm"]["input_arguments"] if "TieredStopAtLevel" in a]
            assert flags == ["-XX:TieredStopAtLevel=1", "-XX:TieredStopAtLevel=4"]
            await ensure_index(client, "workflows")
            index = next(iter(await client.indices.get_alias(name="workflows")))
            analysis = (await client.indices.get_settings(index=index))[index]["settings"]
            assert analysis["index"]["analysis"]["analyzer"]["ja"]["tokenizer"] == \
                "kuromoji_tokenizer"
            await client.index(index="workflows", id="1", body={"version": 5},
                               params={"version": 5, "version_type": "external"})
            with pytest.raises(ConflictError):
                await client.index(index="workflows", id="1", body={"version": 4},
                                   params={"version": 4, "version_type": "external"})
        finally:
            await client.close()

    try:
        asyncio.run(check())
    finally:
        server.stop()


@needs_java17
@pytest.mark.slow
def test_opensearch_keeps_indices_and_aliases_across_a_restart(
    tmp_path: Path, settings: Settings,
) -> None:
    real = settings.model_copy(update={"embedded_opensearch": "opensearch"})
    choice = choose_opensearch(real) if opensearch_node.choose("auto", None) else None
    if choice is None:
        pytest.skip("no JVM for OpenSearch here")
    from infra.embedded import start_opensearch

    port = free_port()
    server = start_opensearch(real, choice, tmp_path, port)
    try:
        _put(f"{server.url}/kept-v1", {"aliases": {"kept": {}}})
        _put(f"{server.url}/kept/_doc/1?refresh=true&version=3&version_type=external",
             {"title": "稟議書の承認依頼"})
    finally:
        server.stop()
    server = start_opensearch(real, choice, tmp_path, port)
    try:
        with urllib.request.urlopen(f"{server.url}/kept/_doc/1", timeout=10) as resp:
            doc = json.load(resp)
        assert doc["_version"] == 3 and doc["_source"]["title"] == "稟議書の承認依頼"
        with urllib.request.urlopen(f"{server.url}/_alias/kept", timeout=10) as resp:
            assert list(json.load(resp)) == ["kept-v1"]
    finally:
        server.stop()


def _put(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), method="PUT",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.load(resp)


def test_the_opensearch_node_runs_unprivileged(settings: Settings) -> None:
    import psutil

    ours = [p for p in psutil.process_iter(["cmdline", "username"])
            if "org.opensearch.bootstrap.OpenSearch" in " ".join(p.info["cmdline"] or [])
            and str(settings.data_path) in " ".join(p.info["cmdline"] or [])]
    if not ours:
        pytest.skip("this session runs osmem")
    assert {p.info["username"] for p in ours} == {opensearch_node.SYSTEM_USER}


@needs_java17
@pytest.mark.slow
async def test_sigkill_of_apache_kafka_mid_load_loses_and_reorders_nothing(
    fresh_db: Settings, tmp_path: Path,
) -> None:
    """The broker is SIGKILLed while commands flow and restarted on its data: every
    event reaches every read model, each aggregate's versions are in order on its
    partition, and `verify` finds every read model clean."""
    import httpx

    from contract import WORKFLOW_EVENTS
    from infra.provision import provision
    from tests.conftest import TEST_JWT_SECRET, component, settings_env
    from tests.events import never_ahead, per_aggregate, read_topic, wait_all_published
    from tests.helpers import Tenant

    apache = fresh_db.model_copy(update={"embedded_kafka": "apache"})
    port = free_port()
    broker = start_broker(apache, tmp_path / "broker", port)
    stack = apache.model_copy(update={"kafka_bootstrap": broker.url})
    provision(stack)
    url = stack.database_url or ""
    workflows: list[str] = []
    try:
        with component("command-api", stack, "RINGIFLOW_COMMAND_API_PORT") as commands, \
                component("relay", stack, "RINGIFLOW_RELAY_PORT",
                          RINGIFLOW_RELAY_MESSAGE_TIMEOUT_MS="3000"), \
                component("workers", stack, "RINGIFLOW_WORKERS_PORT"):
            async with httpx.AsyncClient(base_url=commands, timeout=30) as client:
                tenant = await Tenant(client, TEST_JWT_SECRET, url).setup()

                async def lifecycle(i: int) -> None:
                    created = await tenant.create_workflow(f"障害テスト {i}")
                    workflows.append(created["aggregate_id"])
                    path = f"/workflows/{created['aggregate_id']}"
                    await tenant.ok(tenant.initiator, path + "/submit")
                    for n in range(3):
                        await tenant.ok(tenant.initiator, path + "/comments",
                                        {"body": f"コメント {n}"})

                async def load(start: int, count: int) -> None:
                    for i in range(start, start + count, 4):
                        await asyncio.gather(*(lifecycle(j) for j in range(i, i + 4)))

                await load(0, 20)
                killer = asyncio.create_task(asyncio.to_thread(broker.process.kill))
                await load(20, 20)  # the command API does not need the broker
                await killer
                broker.process.wait()
                await asyncio.sleep(2)
                # Started from this (the main) thread: a child's parent-death signal fires
                # when the thread that spawned it ends, so never from a pool thread.
                broker = start_broker(apache, tmp_path / "broker", port)
                await load(40, 20)
            assert (await asyncio.to_thread(wait_all_published, url, 120))["pending"] == 0
            env = settings_env(stack)
            deadline = time.monotonic() + 120
            for projector in ("workflow-projector", "cache-projector", "search-indexer"):
                while True:
                    result = await asyncio.to_thread(
                        subprocess.run, [sys.executable, "-m", "ringiflow", "verify", projector,
                                         "--tenant", str(tenant.tenant_id)],
                        env=env, capture_output=True, text=True, timeout=300)
                    if result.returncode == 0:
                        break
                    assert time.monotonic() < deadline, result.stdout + result.stderr
                    await asyncio.sleep(2)
        events = await tenant.events()
        ours = {UUID(w) for w in workflows}
        expected = {e["event_id"] for e in events if e["aggregate_id"] in ours}
        consumed = await read_topic(broker.url, WORKFLOW_EVENTS.name, expected, timeout_s=120)
    finally:
        broker.stop()
    assert len(workflows) == 60
    stored: dict = {}
    for e in events:
        stored.setdefault(e["aggregate_id"], []).append(e["version"])
    seen = per_aggregate(consumed)
    for workflow in workflows:
        versions = seen[UUID(workflow)]
        assert set(versions) == set(stored[UUID(workflow)]), workflow
        assert never_ahead(versions), (workflow, versions)


def test_the_broker_holds_every_topic_with_the_catalogues_settings(settings: Settings) -> None:
    """On a broker that reports configs (Apache Kafka; Tansu returns none), each
    topic has the partitions, retention and cleanup policy of contract.all_topics."""
    from confluent_kafka.admin import ConfigResource

    from contract import all_topics
    from infra.kafka import admin_client, is_tansu, topic_partitions

    bootstrap = settings.kafka_bootstrap or ""
    partitions = topic_partitions(bootstrap)
    for topic in all_topics():
        assert partitions.get(topic.name) == topic.partitions, topic.name
    if is_tansu(bootstrap):
        pytest.skip("Tansu reports no topic configs")
    admin = admin_client(bootstrap)
    resources = [ConfigResource("topic", t.name) for t in all_topics()]
    for resource, future in admin.describe_configs(resources).items():
        configs = {k: v.value for k, v in future.result(15).items()}
        wanted = next(t for t in all_topics() if t.name == resource.name).config()
        assert {k: configs[k] for k in wanted} == wanted, resource.name

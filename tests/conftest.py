"""Session-wide embedded stack: real PostgreSQL, Redis, Kafka-protocol broker
and OpenSearch-API server on free ports in a temp dir, migrated, with topics;
torn down even when tests fail."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from uuid import uuid4

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from infra import db
from infra.embedded import start_broker
from infra.provision import embedded_system, provision
from infra.servers import free_port, stop_within
from infra.settings import Settings, libpq_url

TEST_JWT_SECRET = "test-secret-not-for-production-0123456789"
# Which servers a test lane runs on (.ci/run runs the suite on each); kept for subprocesses.
LANE_SETTINGS = ("RINGIFLOW_EMBEDDED_KAFKA", "RINGIFLOW_EMBEDDED_OPENSEARCH",
                 "RINGIFLOW_EMBEDDED_OPENSEARCH_VERSION", "RINGIFLOW_JAVA_HOME",
                 "RINGIFLOW_CACHE_DIR", "RINGIFLOW_MAVEN_SETTINGS")


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def settings(stack_dir: Path) -> Iterator[Settings]:
    base = Settings(data_dir=stack_dir, postgres_fsync=False,
                    jwt_secret=TEST_JWT_SECRET)  # type: ignore[arg-type]
    with embedded_system(base) as ready:
        yield ready


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a `ringiflow` subprocess: no inherited RINGIFLOW_* settings
    but the test lane's choice of servers, its own data dir and free ports."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RINGIFLOW_") or k in LANE_SETTINGS}
    env.update({
        "RINGIFLOW_DATA_DIR": str(tmp_path / "data"),
        "RINGIFLOW_POSTGRES_FSYNC": "false",
        "RINGIFLOW_COMMAND_API_PORT": str(free_port()),
        "RINGIFLOW_QUERY_API_PORT": str(free_port()),
        "RINGIFLOW_RELAY_PORT": str(free_port()),
        "RINGIFLOW_WORKERS_PORT": str(free_port()),
        "RINGIFLOW_CONSOLE_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment a `ringiflow run <component>` subprocess needs to join the stack."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGIFLOW_")}
    for key in ("database_url", "redis_url", "kafka_bootstrap", "opensearch_url", "smtp_url"):
        env[f"RINGIFLOW_{key.upper()}"] = getattr(settings, key)
    env["RINGIFLOW_DATA_DIR"] = str(settings.data_dir)
    env["RINGIFLOW_JWT_SECRET"] = TEST_JWT_SECRET
    env["RINGIFLOW_LOG_LEVEL"] = "WARNING"
    return env


@contextmanager
def component(name: str, settings: Settings, port_setting: str, **extra_env: str) -> Iterator[str]:
    """Run one application process against the test stack; yield its base URL."""
    port = free_port()
    env = settings_env(settings) | {port_setting: str(port)} | extra_env
    log_path = Path(settings.data_dir) / f"{name}-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "ringiflow", "run", name], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not healthy: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        yield base
    finally:
        stop_within(process, name, 10)


@pytest.fixture(scope="session")
def command_api(settings: Settings) -> Iterator[str]:
    with component("command-api", settings, "RINGIFLOW_COMMAND_API_PORT") as base:
        yield base


@pytest.fixture
async def command_pool(settings: Settings) -> AsyncIterator[AsyncConnectionPool]:
    """Autocommit connections of the command role, as the command API holds them: enough
    that every command of a group commit's batch holds its own (ADR 0018)."""
    async with AsyncConnectionPool(libpq_url(settings.role_database_url("command")),
                                   min_size=1, max_size=24,
                                   kwargs={"autocommit": True}) as pool:
        yield pool


@pytest.fixture
def fresh_db(settings: Settings) -> Iterator[Settings]:
    """A database of its own on the session's PostgreSQL, migrated: for tests whose
    background processes (relays, workers) must not see other tests' rows."""
    import psycopg

    from infra.settings import libpq_url

    name = f"t_{os.urandom(6).hex()}"
    admin_url = libpq_url(settings.database_url or "")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = (settings.database_url or "").rsplit("/", 1)[0] + f"/{name}"
    db.migrate(url)
    yield settings.model_copy(update={"database_url": url})
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def isolated(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A database and a broker of its own: the session's topics hold other tests'
    synthetic events, which the workers would have to chew through first. Per
    module, so no system keeps running (and loading the CPU) behind other tests."""
    name = f"e2e_{uuid4().hex[:8]}"
    admin = libpq_url(settings.database_url or "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    broker = start_broker(settings, tmp_path_factory.mktemp("kafka"))
    try:
        ready = settings.model_copy(update={
            "database_url": (settings.database_url or "").rsplit("/", 1)[0] + f"/{name}",
            "kafka_bootstrap": broker.url})
        provision(ready)
        yield ready
    finally:
        broker.stop()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def system(isolated: Settings) -> Iterator[dict[str, str]]:
    settings = isolated
    with component("command-api", settings, "RINGIFLOW_COMMAND_API_PORT") as commands, \
            component("relay", settings, "RINGIFLOW_RELAY_PORT") as relay, \
            component("workers", settings, "RINGIFLOW_WORKERS_PORT") as workers, \
            component("query-api", settings, "RINGIFLOW_QUERY_API_PORT") as queries:
        deadline = time.monotonic() + 60
        while httpx.get(workers + "/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, httpx.get(workers + "/readyz").text
            time.sleep(0.5)
        yield {"commands": commands, "relay": relay, "workers": workers, "queries": queries}

"""Session-wide embedded stack: real PostgreSQL, Redis, Kafka-protocol broker
and OpenSearch-API server on free ports in a temp dir, migrated, with topics;
torn down even when tests fail."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import db, kafka
from infra.embedded import EmbeddedStack
from infra.settings import Settings

TEST_JWT_SECRET = "test-secret-not-for-production-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def settings(stack_dir: Path) -> Iterator[Settings]:
    base = Settings(data_dir=stack_dir, postgres_fsync=False,
                    jwt_secret=TEST_JWT_SECRET)  # type: ignore[arg-type]
    stack = EmbeddedStack(stack_dir, timeout=60)
    try:
        urls = stack.start(base)
        db.migrate(urls["database_url"])
        kafka.ensure_topics(urls["kafka_bootstrap"])
        yield base.model_copy(update=urls)
    finally:
        stack.stop()


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a `ringiflow` subprocess: no inherited RINGIFLOW_* settings,
    its own data dir and free ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGIFLOW_")}
    env.update({
        "RINGIFLOW_DATA_DIR": str(tmp_path / "data"),
        "RINGIFLOW_POSTGRES_FSYNC": "false",
        "RINGIFLOW_COMMAND_API_PORT": str(free_port()),
        "RINGIFLOW_QUERY_API_PORT": str(free_port()),
        "RINGIFLOW_RELAY_PORT": str(free_port()),
        "RINGIFLOW_WORKERS_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    })
    return env

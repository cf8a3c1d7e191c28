"""Operator verbs against running systems."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from uuid import uuid4

import httpx
import pytest

from infra.settings import Settings
from tests.conftest import TEST_JWT_SECRET, settings_env
from tests.helpers import Tenant

pytestmark = pytest.mark.slow


def ringiflow(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ringiflow", *args], env=settings_env(settings),
                          capture_output=True, text=True, timeout=120)


async def test_lag_is_zero_once_the_workers_caught_up(system: dict[str, str],
                                                      isolated: Settings) -> None:
    async with httpx.AsyncClient(base_url=system["commands"], timeout=30) as client:
        tenant = await Tenant(client, TEST_JWT_SECRET, isolated.database_url or "").setup()
        await tenant.submitted_workflow()
    deadline = time.monotonic() + 60
    while True:
        result = ringiflow(isolated, "lag", "--json", "--max-lag", "0")
        report = json.loads(result.stdout)
        if result.returncode == 0:
            break
        assert time.monotonic() < deadline, report["breaches"]
        await asyncio.sleep(1)
    groups = {p["group"] for p in report["partitions"]}
    assert groups == {"workflow-projector", "cache-projector", "search-indexer",
                      "audit-processor", "notification-processor"}
    assert all(p["lag"] == 0 for p in report["partitions"])
    assert report["outbox"]["pending"] == 0


def test_lag_exits_non_zero_when_a_threshold_is_crossed(settings: Settings) -> None:
    from contract import to_record
    from infra.kafka import producer
    from tests.events import comment_envelope

    # No consumer group runs against the session's broker: what is produced is lag.
    record = to_record(comment_envelope(uuid4(), uuid4(), 1))
    unread = producer(settings.kafka_bootstrap or "")
    unread.produce(record.topic, record.value, record.key, headers=list(record.headers))
    assert unread.flush(10) == 0
    result = ringiflow(settings, "lag", "--max-lag", "0")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "ALERT" in result.stderr and "lag" in result.stderr
    assert "workflow-projector" in result.stdout

"""Chaos on `ringiflow up`, as the fault probe did it by hand: steady command
load with retries by idempotency key while, one after the other, the relay,
every Faust worker, a command API process, Redis, OpenSearch, the broker and
every database session are killed. Afterwards nothing accepted is missing,
every topic holds every version of every aggregate in order (re-sends counted,
not refused), and `verify` finds every read model equal to the events table.

Runs on whichever broker and search server the lane chose (CI runs it on
Apache Kafka + OpenSearch and on Tansu + osmem)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import UUID, uuid4

import httpx
import psutil
import psycopg
import pytest

import contract
from infra.settings import libpq_url
from projectors.catalogue import CATALOGUE
from tests.events import never_ahead, per_aggregate, read_topic
from tests.helpers import Tenant, listening_pid
from tests.integration.test_up import get, running

RECOVERY_S = 150  # a fault must heal within this, restarts and backoff included

# Each step is bounded by RECOVERY_S on its own; the whole run (start, eleven
# faults, drain, verify) took 294 s on a slow 2-core machine, so the suite's
# 300 s default would cut it off with nothing wrong.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass
class Load:
    """Commands at a steady pace; each retried with its Idempotency-Key until it
    is answered 2xx (a 4xx is a test failure: the input is valid)."""

    base: str
    secret: str
    database_url: str
    accepted: dict[UUID, int] = field(default_factory=dict)  # aggregate -> version it reached
    retries: int = 0
    refused: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    async def command(self, tenant: Tenant, path: str, body: dict) -> dict:
        key = str(uuid4())
        deadline = time.monotonic() + RECOVERY_S
        while True:
            try:
                r = await tenant.post(tenant.initiator, path, body, **{"Idempotency-Key": key})
                if r.status_code in (200, 201):
                    return r.json()
                if r.status_code < 500 and r.status_code != 429:
                    self.refused.append(f"{path}: {r.status_code} {r.text[:300]}")
                    raise AssertionError(self.refused[-1])
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{path} not accepted within {RECOVERY_S} s"
            self.retries += 1
            await asyncio.sleep(0.2)

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.base, timeout=10) as client:
            tenant = await Tenant(client, self.secret, self.database_url).setup()
            n = 0
            while not self.stop.is_set():
                n += 1
                created = await self.command(tenant, "/workflows", {
                    "definition_id": str(tenant.definition_id), "title": f"障害試験 {n}",
                    "priority": "medium"})
                workflow = UUID(created["aggregate_id"])
                self.accepted[workflow] = created["version"]
                if n % 2:
                    submitted = await self.command(tenant, f"/workflows/{workflow}/submit", {})
                    self.accepted[workflow] = submitted["version"]
                await asyncio.sleep(0.05)

    def thread(self) -> threading.Thread:
        worker = threading.Thread(target=lambda: asyncio.run(self.run()), daemon=True)
        worker.start()
        return worker


def wait_until(what: str, condition: Callable[[], bool], timeout_s: float = RECOVERY_S) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.5)
    return time.monotonic() - started


def test_chaos_every_process_and_server_killed_in_turn_loses_and_reorders_nothing(
    cli_env: dict[str, str],
) -> None:
    cli_env["RINGIFLOW_RELAY_HISTORY_CHECK_INTERVAL_S"] = "1"
    endpoints = {name: f"http://127.0.0.1:{cli_env[f'RINGIFLOW_{name}_PORT']}"
                 for name in ("COMMAND_API", "QUERY_API", "RELAY", "WORKERS")}

    def all_ready() -> bool:
        return all(get(base + "/readyz")[0] == 200 if _answers(base) else False
                   for base in endpoints.values())

    with running(cli_env) as up:
        urls = up.runtime()["urls"]
        database_url = urls["database_url"]
        load = Load(endpoints["COMMAND_API"], (up.data_dir / "jwt-secret").read_text().strip(),
                    database_url)
        loader = load.thread()
        wait_until("first commands", lambda: len(load.accepted) >= 20, 60)

        def kill(pid: int) -> None:
            psutil.Process(pid).kill()

        def worker(group: str) -> int:
            return next(p.pid for p in psutil.Process(up.runtime()["pids"]["workers"][0])
                        .children() if group in p.cmdline())

        def terminate_sessions() -> None:
            with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
                killed = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE usename LIKE 'ringiflow_%%' AND datname = current_database()"
                ).fetchone()
            assert killed and killed[0] >= 5

        faults: list[tuple[str, Callable[[], None]]] = [
            ("relay", lambda: kill(up.runtime()["pids"]["relay"][0])),
            *[(f"worker {group}", lambda group=group: kill(worker(group)))
              for group in CATALOGUE],
            ("a command API process", lambda: kill(up.runtime()["pids"]["command-api"][0])),
            ("Redis", lambda: kill(listening_pid(urls["redis_url"]))),
            ("OpenSearch", lambda: kill(listening_pid(urls["opensearch_url"]))),
            ("the broker", lambda: kill(listening_pid(urls["kafka_bootstrap"]))),
            ("every database session", terminate_sessions),
        ]
        healed: dict[str, float] = {}
        for name, fault in faults:
            wait_until(f"ready before killing {name}", all_ready)
            fault()
            time.sleep(2)  # let the fault bite before asking whether it healed
            healed[name] = wait_until(f"recovery from killing {name}", all_ready)
            assert loader.is_alive(), f"load stopped after killing {name}: {load.refused}"
        accepted_before_stop = len(load.accepted)
        load.stop.set()
        loader.join(RECOVERY_S)
        assert not load.refused
        assert up.process.poll() is None, "ringiflow up stopped:\n" + "".join(up.output)

        # Every accepted command is in the events table.
        with psycopg.connect(libpq_url(database_url)) as conn:
            stored = dict(conn.execute(
                "SELECT aggregate_id, max(version) FROM event_store.events "
                "WHERE aggregate_type = 'workflow' GROUP BY 1").fetchall())
            events = conn.execute("SELECT event_id, aggregate_type FROM event_store.events"
                                  ).fetchall()
        assert accepted_before_stop >= 50
        short = {a: (v, stored.get(a)) for a, v in load.accepted.items()
                 if (stored.get(a) or 0) < v}
        assert short == {}

        env = cli_env | {"RINGIFLOW_DATABASE_URL": database_url}

        def drained() -> bool:
            report = _cli(env, "lag", "--json")
            return all(p["lag"] == 0 for p in report["partitions"]) and \
                report["outbox"]["pending"] == 0

        wait_until("outbox and consumers drained", drained)

        # Every topic holds every version of every aggregate, in order.
        duplicates = 0
        for aggregate_type in contract.AggregateType:
            topic = contract.events_topic_name(aggregate_type)
            expected = {e for e, t in events if t == aggregate_type.value}
            consumed = asyncio.run(read_topic(urls["kafka_bootstrap"], topic, expected,
                                              timeout_s=120))
            assert {c.envelope.event_id for c in consumed} >= expected
            for aggregate, versions in per_aggregate(consumed).items():
                assert set(versions) == set(range(1, max(versions) + 1)), aggregate
                assert never_ahead(versions), (topic, aggregate, versions)
                duplicates += len(versions) - len(set(versions))

        # And every read model equals the events table.
        for projector in ("workflow-projector", "cache-projector", "search-indexer"):
            deadline = time.monotonic() + 60
            while True:
                run = subprocess.run([sys.executable, "-m", "ringiflow", "verify", projector,
                                      "--json"], env=env, capture_output=True, text=True,
                                     timeout=120)
                if run.returncode == 0:
                    break
                assert time.monotonic() < deadline, f"verify {projector}: {run.stdout[:3000]}"
                time.sleep(2)
        assert up.stop(signal.SIGTERM) == 0
    print(f"\nchaos: {len(load.accepted)} workflows, {load.retries} retried requests, "
          f"{duplicates} re-sent records; seconds to heal: "
          + ", ".join(f"{k} {v:.0f}" for k, v in healed.items()))


def _answers(base: str) -> bool:
    try:
        httpx.get(base + "/healthz", timeout=2)
        return True
    except httpx.HTTPError:
        return False


def _cli(env: dict[str, str], *args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "ringiflow", *args], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.stdout, result.stderr
    return json.loads(result.stdout)

"""The benchmarks' CPU report names each process it started by what it is, and
counts a busy child's time to it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from benchmarks import cpu

ROOT = 100
TABLE = {
    ROOT: cpu.Process(1, 1.0, "python -m benchmarks.freshness"),
    200: cpu.Process(ROOT, 3.0, "/usr/lib/postgresql/18/bin/postgres -D /tmp/x/pg"),
    201: cpu.Process(200, 2.0, "postgres: ringiflow_command ringiflow 127.0.0.1(5000) idle"),
    300: cpu.Process(ROOT, 0.1, "/bin/sh /opt/opensearch-3.8.0/bin/opensearch"),
    301: cpu.Process(300, 9.0, "/usr/lib/jvm/temurin-25/bin/java -Dopensearch.path.home=/x"),
    400: cpu.Process(ROOT, 4.0, "java -Xmx512m -cp /k/libs/* kafka.Kafka /tmp/x/server.properties"),
    500: cpu.Process(ROOT, 1.0, "/x/.venv/bin/python -m ringiflow run workers"),
    501: cpu.Process(500, 2.0, "/x/.venv/bin/python -m ringiflow projector cache-projector "
                               "--port 2"),
    600: cpu.Process(ROOT, 1.0, "/x/.venv/bin/python -m ringiflow run query-api"),
    700: cpu.Process(1, 50.0, "some other tenant's process on the machine"),
}


@pytest.mark.parametrize(("pid", "expected"), [
    (201, "PostgreSQL"), (200, "PostgreSQL"), (301, "OpenSearch"), (400, "Apache Kafka"),
    (500, "workers"), (501, "cache-projector"), (600, "query-api"), (700, None)])
def test_each_process_is_named_by_what_it_is(pid: int, expected: str | None) -> None:
    assert cpu.kind(pid, TABLE, ROOT) == expected


def test_shares_sum_a_kind_over_its_processes_and_leave_out_strangers() -> None:
    before = {pid: cpu.Process(p.parent, 0.0, p.command) for pid, p in TABLE.items()}
    used = dict(cpu.shares(before, TABLE, seconds=10.0, root=ROOT))
    assert used["PostgreSQL"] == pytest.approx(0.5)  # postmaster 3 s + a backend 2 s
    assert used["OpenSearch"] == pytest.approx(0.91)
    assert used["this benchmark"] == pytest.approx(0.1)
    assert "other" not in used and sum(used.values()) == pytest.approx(2.31)
    line = cpu.report(list(used.items()), cores=2)
    assert line.startswith("CPU over this run: 231 % of 200 %")
    assert "OpenSearch 91" in line


def test_a_process_that_replaced_a_finished_one_counts_from_zero() -> None:
    before = {ROOT: TABLE[ROOT], 600: cpu.Process(ROOT, 0.5, "an earlier process")}
    used = dict(cpu.shares(before, {ROOT: TABLE[ROOT], 600: TABLE[600]}, 1.0, root=ROOT))
    assert used["query-api"] == pytest.approx(1.0)


def test_a_busy_child_is_counted_to_it() -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass"
    before, started = cpu.processes(), time.monotonic()
    child = subprocess.Popen([sys.executable, "-c", burn + "\ntime.sleep(30)"])
    try:
        while cpu.processes().get(child.pid, cpu.Process(0, 0.0, "")).cpu_s < 0.35:
            time.sleep(0.05)
        seconds = time.monotonic() - started
        used = dict(cpu.shares(before, cpu.processes(), seconds))
    finally:
        child.kill()
        child.wait()
    assert used["other"] * seconds >= 0.35


def test_a_client_that_ran_and_ended_inside_is_counted_by_its_name() -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    done, used = cpu.during(lambda: subprocess.run([sys.executable, "-c", burn], check=True),
                            ended_as="wrk")
    assert done.returncode == 0
    shares = dict(used)
    assert shares["wrk"] > 0.3 and used[0][0] == "wrk", "the busiest first"


async def test_an_awaited_load_is_measured_over_the_block() -> None:
    """As benchmarks.freshness measures its client's coroutine: the block's own CPU
    is the benchmark's, and the shares are there once the block ends."""
    with cpu.measuring() as usage:
        assert usage.used == []
        async def burn() -> None:  # a coroutine that keeps this process busy
            started = time.process_time()
            while time.process_time() - started < 0.2:
                pass

        await asyncio.gather(burn(), asyncio.sleep(0))
    shares = dict(usage.used)
    assert shares["this benchmark"] > 0.5, usage.used

"""Shared benchmark plumbing: an embedded stack, application processes, and
latency statistics. Figures are printed next to a baseline from the same run,
because these machines are shared and noisy."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from infra.provision import embedded_system
from infra.servers import free_port
from infra.settings import Settings

BENCH_SECRET = "benchmark-secret-0123456789abcdef0123456789"


# --broker picks the pair of servers a benchmark runs on: the real ones, or the
# in-memory stand-ins.
BROKERS = {"apache": ("apache", "opensearch"), "tansu": ("tansu", "osmem")}


def add_broker_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", choices=sorted(BROKERS), default="apache",
                        help="apache: Apache Kafka + OpenSearch; tansu: Tansu + osmem "
                             "(in-memory stand-ins)")


@contextmanager
def embedded_stack(fsync: bool = True, broker: str = "apache") -> Iterator[Settings]:
    kafka, opensearch = BROKERS[broker]
    with tempfile.TemporaryDirectory(prefix="ringiflow-bench-") as tmp:
        base = Settings(data_dir=Path(tmp), postgres_fsync=fsync, jwt_secret=BENCH_SECRET,
                        embedded_kafka=kafka, embedded_opensearch=opensearch)  # type: ignore[arg-type]
        with embedded_system(base) as ready:
            yield ready


def app_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a `ringiflow` process needs to join this stack."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGIFLOW_")}
    for key in ("database_url", "redis_url", "kafka_bootstrap", "opensearch_url"):
        env[f"RINGIFLOW_{key.upper()}"] = getattr(settings, key)
    return env | {"RINGIFLOW_DATA_DIR": str(settings.data_dir), "RINGIFLOW_JWT_SECRET":
                  BENCH_SECRET, "RINGIFLOW_LOG_LEVEL": "WARNING"} | extra


@contextmanager
def app_process(name: str, settings: Settings, port_setting: str,
                processes: int = 1) -> Iterator[str]:
    """Run `processes` copies of one API on one port (as `ringiflow up` does)."""
    port = free_port()
    env = app_env(settings, **{port_setting: str(port)})
    running = [subprocess.Popen([sys.executable, "-m", "ringiflow", "run", name], env=env)
               for _ in range(processes)]
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        yield base
    finally:
        for process in running:
            process.terminate()
        for process in running:
            process.wait(10)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(label: str, rate: float, latencies_s: list[float], baseline: float | None = None,
            baseline_label: str = "") -> str:
    line = (f"{label:<44} {rate:>9,.0f}/s  p50 {percentile(latencies_s, .5) * 1000:6.1f} ms  "
            f"p99 {percentile(latencies_s, .99) * 1000:6.1f} ms")
    if baseline:
        line += f"  = {rate / baseline:.2f} x {baseline_label}"
    return line


def median(values: list[float]) -> float:
    return statistics.median(values)

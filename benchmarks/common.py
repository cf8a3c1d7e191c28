"""Shared benchmark plumbing: an embedded stack, application processes, and
latency statistics. Figures are printed next to a baseline from the same run,
because these machines are shared and noisy."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


# wrk's Lua `done` hook prints one JSON line the benchmark reads back.
_WRK_REPORT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %d, "non2xx": %d, "socket_errors": %d, "duration_us": %d, '
    .. '"p50_us": %d, "p99_us": %d}\\n', summary.requests, e.status,
    e.connect + e.read + e.write + e.timeout, summary.duration,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class WrkResult:
    rate: float  # successful requests per second
    p50_s: float
    p99_s: float
    failed: int  # non-2xx answers and socket errors

    def line(self, label: str, baseline: float | None = None, baseline_label: str = "") -> str:
        text = (f"{label:<44} {self.rate:>9,.0f}/s  p50 {self.p50_s * 1000:6.1f} ms  "
                f"p99 {self.p99_s * 1000:6.1f} ms")
        if baseline:
            text += f"  = {self.rate / baseline:.2f} x {baseline_label}"
        return text + (f"  ({self.failed:,} failed)" if self.failed else "")


def require_wrk() -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk (Debian's package)")


def wrk(url: str, script: str = "", seconds: float = 8, connections: int = 32,
        threads: int = 2) -> WrkResult:
    """Load from `wrk` (Debian package `wrk`): a compiled client in its own process,
    so the figure is the server's, not a Python client's. `script` is wrk Lua
    (request shape); the report hook is added here."""
    require_wrk()
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script + _WRK_REPORT)
        lua.flush()
        out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections),
                              "-d", f"{max(1, round(seconds))}s", "-s", lua.name, url],
                             capture_output=True, text=True, check=True).stdout
    report = json.loads(next(line[4:] for line in out.splitlines() if line.startswith("WRK ")))
    failed = report["non2xx"] + report["socket_errors"]
    ok = report["requests"] - report["non2xx"]
    return WrkResult(ok / (report["duration_us"] / 1e6), report["p50_us"] / 1e6,
                     report["p99_us"] / 1e6, failed)


def lua_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"

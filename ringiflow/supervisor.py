"""`ringiflow up`: embedded infrastructure, migrations, topics, then the
application processes, each restarted with backoff when it crashes.

Children get a parent-death signal, so nothing outlives the supervisor, even
when the supervisor itself is SIGKILLed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from infra.embedded import EmbeddedError, EmbeddedStack, claim_port, die_with_parent
from infra.provision import provision
from infra.settings import RUNTIME_FILE, ConfigError, Settings, redact_url
from ringiflow.components import COMPONENTS, Component

log = logging.getLogger("ringiflow.up")

INITIAL_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0  # a child that ran this long gets its backoff reset


@dataclass
class Child:
    component: Component
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = INITIAL_BACKOFF_S
    restart_at: float | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ringiflow", "run", self.component.name],
                env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(),
            )
        self.started_at = time.monotonic()
        self.restart_at = None

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", self.component.name, timeout)
            self.process.kill()
            self.process.wait()


@dataclass
class Supervisor:
    settings: Settings
    stack: EmbeddedStack = field(init=False)
    children: list[Child] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.stack = EmbeddedStack(self.settings.data_path, self.settings.startup_timeout_s)

    @property
    def runtime_file(self) -> Path:
        return self.settings.data_path / RUNTIME_FILE

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: self.stopping.set())
        started = time.monotonic()
        try:
            self._check_app_ports()
            self._preflight_external()
            urls = self.stack.start(self.settings)
            if self.stopping.is_set():
                return 0
            print_step("migrations and topics", "applying")
            reports = provision(self.settings.model_copy(update=urls))
            created = sum(r.state == "created" for r in reports)
            print_step("topics", f"{len(reports)} ensured ({created} created)")
            for r in reports:
                if r.state == "partition_mismatch":
                    log.warning("topic %s has %d partitions, the catalogue says %d", r.name,
                                r.partitions, r.wanted_partitions)
            self._start_children(urls)
            self._wait_children_healthy()
            self.urls = urls
            self._write_runtime(urls)
            self._print_endpoints(urls, time.monotonic() - started)
            while not self.stopping.wait(0.5):
                self._supervise()
            return 0
        finally:
            self.shutdown()

    def _preflight_external(self) -> None:
        """Fail fast, naming the setting, when an external server is unreachable."""
        import asyncio

        from infra import clients

        probes = {
            "database_url": clients.check_postgres, "redis_url": clients.check_redis,
            "kafka_bootstrap": clients.check_kafka, "opensearch_url": clients.check_opensearch,
        }
        external = {k: getattr(self.settings, k) for k in probes if getattr(self.settings, k)}
        if not external:
            return

        async def probe_all() -> dict[str, str]:
            return await clients.run_checks(
                {k: (lambda k=k, u=u: probes[k](u)) for k, u in external.items()}, limit_s=10
            )

        for key, result in asyncio.run(probe_all()).items():
            if result != "ok":
                raise ConfigError(
                    f"RINGIFLOW_{key.upper()}={redact_url(external[key])} is {result}; start "
                    f"that server, correct the URL, or unset RINGIFLOW_{key.upper()} to use "
                    "the embedded one"
                )

    def _check_app_ports(self) -> None:
        for component in COMPONENTS.values():
            claim_port(getattr(self.settings, component.port_setting),
                       f"RINGIFLOW_{component.port_setting.upper()}")

    def _start_children(self, urls: dict[str, str]) -> None:
        env = {**os.environ, **{f"RINGIFLOW_{k.upper()}": v for k, v in urls.items()},
               "RINGIFLOW_DATA_DIR": str(self.settings.data_path),
               "RINGIFLOW_JWT_SECRET": self.settings.dev_jwt_secret}
        for component in COMPONENTS.values():
            for instance in range(component.instances(self.settings)):
                suffix = f"-{instance + 1}" if instance else ""
                child = Child(component, env, self.settings.data_path / "logs"
                              / f"{component.name}{suffix}.log")
                child.start()
                self.children.append(child)

    def _wait_children_healthy(self) -> None:
        deadline = time.monotonic() + self.settings.startup_timeout_s
        pending = list(self.children)
        while pending and not self.stopping.is_set():
            for child in list(pending):
                assert child.process is not None
                if child.process.poll() is not None:
                    raise EmbeddedError(
                        f"{child.component.name} exited with code {child.process.returncode} "
                        f"during start-up; see {child.log_path}:\n{tail(child.log_path)}"
                    )
                # Ready, not just alive: `up` reports a system that can serve.
                if http_ok(child.component.url(self.settings) + "/readyz"):
                    pending.remove(child)
            if time.monotonic() > deadline:
                names = ", ".join(c.component.name for c in pending)
                raise EmbeddedError(
                    f"{names} not ready within {self.settings.startup_timeout_s:.0f} s; "
                    f"logs in {self.settings.data_path / 'logs'}"
                )
            time.sleep(0.1)

    def _supervise(self) -> None:
        now = time.monotonic()
        for server in self.stack.servers.values():
            if not server.alive():
                log.error("embedded %s died (code %s); see %s. Stopping: restart `ringiflow up`.",
                          server.name, server.process.returncode, server.log_path)
                self.stopping.set()
                return
        for child in self.children:
            assert child.process is not None
            code = child.process.poll()
            if code is None:
                if now - child.started_at > STABLE_AFTER_S:
                    child.backoff = INITIAL_BACKOFF_S
                continue
            if child.restart_at is None:
                child.restart_at = now + child.backoff
                log.error("%s exited with code %s; restarting in %.0f s (log: %s)",
                          child.component.name, code, child.backoff, child.log_path)
                child.backoff = min(child.backoff * 2, MAX_BACKOFF_S)
            elif now >= child.restart_at:
                child.restarts += 1
                child.start()
                log.warning("%s restarted (restart #%d)", child.component.name, child.restarts)
                self._write_runtime(self.urls)

    def _write_runtime(self, urls: dict[str, str]) -> None:
        runtime = {
            "pid": os.getpid(),
            "urls": urls,
            "servers": {key: server.name for key, server in self.stack.servers.items()},
            "endpoints": {c.component.name: c.component.url(self.settings)
                          for c in self.children},
            "pids": {c.component.name: [p.process.pid for p in self.children
                                        if p.component is c.component and p.process]
                     for c in self.children},
        }
        tmp = self.runtime_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(runtime, indent=2))
        tmp.replace(self.runtime_file)

    def _print_endpoints(self, urls: dict[str, str], elapsed: float) -> None:
        labels = {"database_url": "PostgreSQL", "redis_url": "Redis",
                  "kafka_bootstrap": "Kafka", "opensearch_url": "OpenSearch"}
        lines = [f"RingiFlow is up in {elapsed:.1f} s (Ctrl-C or SIGTERM stops everything)"]
        for component in COMPONENTS.values():
            base = component.url(self.settings)
            processes = component.instances(self.settings)
            lines.append(f"  {component.description:<34} {base}  (/healthz /readyz /metrics"
                         + (f"; {processes} processes)" if processes > 1 else ")"))
        for key, url in urls.items():
            server = self.stack.servers.get(key)
            label = f"{server.name}, embedded" if server else f"{labels[key]} (external)"
            lines.append(f"  {label:<38} {url}")
        lines.append(f"  {'data dir':<34} {self.settings.data_path}")
        lines.append(f"  {'logs':<34} {self.settings.data_path / 'logs'}")
        print("\n".join(lines), flush=True)

    def shutdown(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()
        self.stack.stop()
        self.runtime_file.unlink(missing_ok=True)


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def print_step(step: str, detail: str) -> None:
    print(f"· {step}: {detail}", flush=True)


def up(settings: Settings) -> int:
    running = _running_supervisor(settings)
    if running:
        raise ConfigError(
            f"`ringiflow up` is already running (pid {running}) with data dir "
            f"{settings.data_path}; stop it first or pass a different --data-dir"
        )
    return Supervisor(settings).run()


def _running_supervisor(settings: Settings) -> int | None:
    from infra.settings import read_runtime

    runtime = read_runtime(settings.data_path)
    if not runtime:
        return None
    pid = runtime.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid

"""`ringiflow up`: embedded infrastructure, migrations, topics, then the
application processes, each restarted with backoff when it crashes.

An embedded server that dies is started again on its data and port, with
backoff, and the processes that depend on it are restarted with it. Redis and
OpenSearch are degradable: while they are down (or after `up` gave up on them)
the system serves what it can. PostgreSQL and Kafka are not: after a bounded
number of failed restarts `up` stops, naming the server and its log.

Children get a parent-death signal (SIGKILL), so nothing outlives the
supervisor, even when the supervisor itself is SIGKILLed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from infra.embedded import EmbeddedStack
from infra.logsafe import tighten
from infra.processes import RESTART, STABLE_AFTER_S, Child
from infra.provision import provision
from infra.retry import Delays
from infra.servers import EmbeddedError, Server, claim_port
from infra.settings import RUNTIME_FILE, ConfigError, Settings, redact_url, write_private
from ringiflow.components import COMPONENTS

log = logging.getLogger("ringiflow.up")

SERVER_RESTART_TRIES = 5  # 1 + 2 + 4 + 8 + 16 s of backoff, then give up
STOP_GRACE_S = 10.0
# The processes held while a server they need is down recover from a kill by design
# (the chaos test kills every one), and without a broker they cannot stop cleanly
# anyway (a worker's last offset commit has nowhere to go: the workers took the full
# 10 s and were killed): a short grace, all at once, so the restart waits for neither.
HELD_STOP_GRACE_S = 2.0

# Servers the system keeps serving without: caches, counters and search degrade, every
# command and every other read keeps working (ADR 0006).
DEGRADABLE = {"redis_url": "the dashboard counters, caches and live updates",
              "opensearch_url": "search"}
# Processes restarted with a server: a broker may come back without the topics,
# offsets and producer state they hold (the relay then re-fills it in order); the
# in-memory search stand-in comes back without its index (re-indexed below).
DEPENDENTS = {"kafka_bootstrap": ("relay", "workers"), "osmem": ("workers",)}


@dataclass
class ServerWatch:
    """Restart bookkeeping of one embedded server."""

    tries: int = 0
    delays: Delays = field(default_factory=RESTART.start)
    restart_at: float | None = None
    given_up: bool = False
    up_since: float = field(default_factory=time.monotonic)


@dataclass
class Supervisor:
    settings: Settings
    stack: EmbeddedStack = field(init=False)
    children: list[Child] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)
    stopping: threading.Event = field(default_factory=threading.Event)
    watches: dict[str, ServerWatch] = field(default_factory=dict)
    exit_code: int = 0

    def __post_init__(self) -> None:
        self.stack = EmbeddedStack(self.settings.data_path, self.settings.startup_timeout_s)

    @property
    def runtime_file(self) -> Path:
        return self.settings.data_path / RUNTIME_FILE

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: self.stopping.set())
        started = time.monotonic()
        tighten(self.settings.data_path / "logs")  # what an older version left readable
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
            return self.exit_code
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
        # The ports `up` was given (flags, not only the environment) reach every child.
        env |= {f"RINGIFLOW_{c.port_setting.upper()}": str(getattr(self.settings, c.port_setting))
                for c in COMPONENTS.values()}
        for component in COMPONENTS.values():
            for instance in range(component.instances(self.settings)):
                suffix = f"-{instance + 1}" if instance else ""
                child = Child(component.name,
                              [sys.executable, "-m", "ringiflow", "run", component.name], env,
                              self.settings.data_path / "logs" / f"{component.name}{suffix}.log")
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
                        f"{child.name} exited with code {child.process.returncode} "
                        f"during start-up; see {child.log_path}:\n{tail(child.log_path)}"
                    )
                # Ready, not just alive: `up` reports a system that can serve.
                if http_ok(COMPONENTS[child.name].url(self.settings) + "/readyz"):
                    pending.remove(child)
            if time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise EmbeddedError(
                    f"{names} not ready within {self.settings.startup_timeout_s:.0f} s; "
                    f"logs in {self.settings.data_path / 'logs'}"
                )
            time.sleep(0.1)

    def _supervise(self) -> None:
        for key in list(self.stack.servers):
            self._watch_server(key)
            if self.stopping.is_set():
                return
        now = time.monotonic()
        if any([child.tend(now) for child in self.children]):
            self._write_runtime(self.urls)

    def _watch_server(self, key: str) -> None:
        """Restart a dead embedded server (same data, same port) with backoff, and
        the processes that depend on it; give up after SERVER_RESTART_TRIES."""
        server = self.stack.servers[key]
        watch = self.watches.setdefault(key, ServerWatch())
        now = time.monotonic()
        if watch.given_up:
            return
        if server.alive():
            if watch.tries and now - watch.up_since > STABLE_AFTER_S:
                watch.tries = 0
                watch.delays.reset()
            return
        if watch.restart_at is None:
            impact = (f"degraded: {DEGRADABLE[key]} unavailable meanwhile"
                      if key in DEGRADABLE else "the system waits for it")
            delay = watch.delays.next()
            log.error("embedded %s died (code %s; log %s); restarting it in %.0f s, %s",
                      server.name, server.process.returncode, server.log_path, delay, impact)
            watch.restart_at = now + delay
            held = self._dependents(key)
            for child in held:
                log.warning("stopping %s until %s is back", child.name, server.name)
                child.held = True
            with ThreadPoolExecutor(max(1, len(held))) as stopping:
                list(stopping.map(lambda child: child.stop(HELD_STOP_GRACE_S), held))
            return
        if now < watch.restart_at:
            return
        watch.tries += 1
        try:
            restarted = self.stack.restart(key)
        except Exception as exc:  # whatever stops it from starting, the same backoff
            if watch.tries >= SERVER_RESTART_TRIES:
                self._give_up(key, server, watch, exc)
                return
            delay = watch.delays.next()
            watch.restart_at = now + delay
            log.error("embedded %s did not start again (try %d of %d): %s; next try in %.0f s",
                      server.name, watch.tries, SERVER_RESTART_TRIES, exc, delay)
            return
        watch.restart_at, watch.up_since = None, time.monotonic()
        log.warning("embedded %s restarted at %s (restart #%d)", restarted.name, restarted.url,
                    watch.tries)
        if key == "kafka_bootstrap":
            from infra.kafka import ensure_topics

            ensure_topics(restarted.url)  # a memory broker comes back without them
        if self._dependency_key(key) == "osmem":
            self._reindex()
        for child in self._dependents(key):
            child.held = False
            child.restarts += 1
            child.start()
        self._write_runtime(self.urls)

    def _give_up(self, key: str, server: Server, watch: ServerWatch,
                 error: Exception) -> None:
        watch.given_up = True
        if key in DEGRADABLE:
            log.critical("gave up restarting embedded %s after %d tries (%s; log %s): "
                         "RingiFlow keeps running without %s; restart `ringiflow up` to "
                         "bring it back", server.name, watch.tries, error, server.log_path,
                         DEGRADABLE[key])
            return
        log.critical("gave up restarting embedded %s after %d tries (%s); its log is %s. "
                     "Stopping: fix the cause, then run `ringiflow up` again", server.name,
                     watch.tries, error, server.log_path)
        self.exit_code = 1
        self.stopping.set()

    def _reindex(self) -> None:
        """osmem restarted empty: re-project search from the events table (the
        search-indexer's offsets are past everything it had indexed)."""
        from operations.replay import replay
        from operations.scope import Scope

        log.warning("osmem restarted empty; re-indexing search from the events table")
        report = replay(self.settings.model_copy(update=self.urls), "search-indexer", Scope())
        log.warning("re-indexed %d events of %d aggregates in %.1f s", report.events,
                    report.aggregates, report.seconds)

    def _dependency_key(self, key: str) -> str:
        server = self.stack.servers.get(key)
        return "osmem" if server is not None and "osmem" in server.name else key

    def _dependents(self, key: str) -> list[Child]:
        names = DEPENDENTS.get(self._dependency_key(key), ())
        return [c for c in self.children if c.name in names]

    def _write_runtime(self, urls: dict[str, str]) -> None:
        runtime = {
            "pid": os.getpid(),
            "urls": urls,
            "servers": {key: server.name for key, server in self.stack.servers.items()},
            "endpoints": {c.name: COMPONENTS[c.name].url(self.settings)
                          for c in self.children},
            "pids": {c.name: [p.process.pid for p in self.children
                              if p.name == c.name and p.process]
                     for c in self.children},
        }
        # Private: the owner URL in it carries the embedded PostgreSQL's password.
        tmp = self.runtime_file.with_suffix(".tmp")
        write_private(tmp, json.dumps(runtime, indent=2))
        tmp.replace(self.runtime_file)

    def _print_endpoints(self, urls: dict[str, str], elapsed: float) -> None:
        labels = {"database_url": "PostgreSQL", "redis_url": "Redis",
                  "kafka_bootstrap": "Kafka", "opensearch_url": "OpenSearch",
                  "smtp_url": "SMTP"}
        lines = [f"RingiFlow is up in {elapsed:.1f} s (Ctrl-C or SIGTERM stops everything)"]
        for component in COMPONENTS.values():
            base = component.url(self.settings)
            processes = component.instances(self.settings)
            lines.append(f"  {component.description:<34} {base}  (/healthz /readyz /metrics"
                         + (f"; {processes} processes)" if processes > 1 else ")"))
        for key, url in urls.items():
            server = self.stack.servers.get(key)
            label = f"{server.name}, embedded" if server else f"{labels[key]} (external)"
            lines.append(f"  {label:<38} {redact_url(url)}")
        if "smtp_url" in self.stack.servers:
            lines.append(f"  {'caught mail':<34} {self.settings.data_path / 'mail'}  "
                         "(`ringiflow notifications list`)")
        lines.append(f"  {'data dir':<34} {self.settings.data_path}")
        lines.append(f"  {'logs':<34} {self.settings.data_path / 'logs'}")
        print("\n".join(lines), flush=True)

    def shutdown(self) -> None:
        for child in reversed(self.children):
            child.stop(STOP_GRACE_S)
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

"""A supervised child process, the one kind both supervisors keep: `ringiflow up` its
components, `ringiflow run workers` its projection workers.

Started with a parent-death signal (nothing outlives its supervisor, even one that was
SIGKILLed) and a private log; stopped within a grace period, SIGKILL after it; and
restarted with the shared backoff (`infra.retry`) when it dies, the backoff starting
over once it ran long enough to count as healthy."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from infra.logsafe import open_log
from infra.retry import Backoff, Delays
from infra.servers import die_with_parent, stop_within

log = logging.getLogger("ringiflow.processes")

RESTART = Backoff(1.0, 30.0)
STABLE_AFTER_S = 60.0  # a child that ran this long gets its backoff reset


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    # Its own process group (the supervisor can sweep it, Ctrl-C reaches only the
    # supervisor), or the supervisor's (whoever stops the supervisor sweeps both).
    own_group: bool = True
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    delays: Delays = field(default_factory=RESTART.start)
    restart_at: float | None = None
    held: bool = False  # stopped on purpose until what it depends on is back

    def start(self) -> None:
        with open_log(self.log_path) as out:  # 0600 in a 0700 dir; children redact lines
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT,
                # SIGKILL, not SIGTERM: a worker shutting down against a dead broker
                # ignores SIGTERM and would outlive its supervisor; nothing a child
                # holds needs a goodbye (an unacknowledged batch is redelivered).
                preexec_fn=die_with_parent(signal.SIGKILL, own_group=self.own_group))
        self.started_at = time.monotonic()
        self.restart_at = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace_s: float) -> None:
        """SIGTERM, SIGKILL after the grace period; then SIGKILL for anything left in
        its own process group (the workers' Faust processes live in `run workers`')."""
        if self.process is None:
            return
        stop_within(self.process, self.name, grace_s)
        if self.own_group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def tend(self, now: float) -> bool:
        """One supervision step; True when it restarted the child. A running child
        that has been up long enough gets its backoff reset; a dead one is restarted
        once its backoff has passed."""
        if self.held or self.process is None:
            return False
        code = self.process.poll()
        if code is None:
            if now - self.started_at > STABLE_AFTER_S:
                self.delays.reset()
            return False
        if self.restart_at is None:
            delay = self.delays.next()
            self.restart_at = now + delay
            log.error("%s exited with code %s; restarting in %.0f s (log: %s)", self.name,
                      code, delay, self.log_path)
            return False
        if now < self.restart_at:
            return False
        self.restarts += 1
        self.start()
        log.warning("%s restarted (restart #%d)", self.name, self.restarts)
        return True

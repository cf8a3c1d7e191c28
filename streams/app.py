"""`ringiflow run workers`: one Faust worker process per projection (Faust runs
one app, so one consumer group, per process), restarted with backoff when one
crashes, behind one health endpoint: /healthz (alive), /readyz (every worker
ready), /metrics (all workers' metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse

from infra.embedded import die_with_parent, free_port
from infra.logsafe import open_log
from infra.settings import Settings
from projectors.catalogue import CATALOGUE

log = logging.getLogger("ringiflow.workers")

# Below the supervisor's own grace for this process, so the workers are gone
# before it would SIGKILL us (and them, by the parent-death signal).
STOP_GRACE_S = 6.0


@dataclass
class WorkerProcess:
    group: str
    port: int
    process: subprocess.Popen | None = None
    restarts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, settings: Settings) -> None:
        log_path = settings.data_path / "logs" / f"worker-{self.group}.log"
        env = {**os.environ, "RINGIFLOW_WORKERS_HOST": "127.0.0.1"}
        with open_log(log_path) as out:  # 0600 in a 0700 dir; the worker redacts its lines
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ringiflow", "projector", self.group,
                 "--port", str(self.port)],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                # SIGKILL, not SIGTERM: a worker shutting down against a dead broker
                # ignores SIGTERM, and would outlive `up` (nothing it holds needs a
                # goodbye: an unacknowledged batch is redelivered). In this process's
                # group, so whoever stops this process can sweep the group.
                preexec_fn=die_with_parent(signal.SIGKILL, own_group=False))

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM, then SIGKILL after the grace period: bounded, whatever Faust does."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not stop within %.0f s; killing it", self.group,
                            grace_s)
                self.process.kill()
                self.process.wait()


def create_app(settings: Settings) -> FastAPI:
    workers = [WorkerProcess(group, free_port()) for group in CATALOGUE]

    async def supervise() -> None:
        backoff = {w.group: 1.0 for w in workers}
        while True:
            await asyncio.sleep(1.0)
            for worker in workers:
                if worker.process and worker.process.poll() is not None:
                    log.error("worker %s exited with %s; restarting in %.0f s", worker.group,
                              worker.process.returncode, backoff[worker.group])
                    await asyncio.sleep(backoff[worker.group])
                    backoff[worker.group] = min(backoff[worker.group] * 2, 30.0)
                    worker.restarts += 1
                    worker.start(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        for worker in workers:
            worker.start(settings)
        task = asyncio.create_task(supervise())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.gather(*(asyncio.to_thread(w.stop) for w in workers))

    app = FastAPI(title="RingiFlow workers", lifespan=lifespan)

    async def each(path: str) -> dict[str, httpx.Response | None]:
        async with httpx.AsyncClient(timeout=3) as client:
            async def one(worker: WorkerProcess) -> httpx.Response | None:
                try:
                    return await client.get(worker.url + path)
                except httpx.HTTPError:
                    return None
            results = await asyncio.gather(*(one(w) for w in workers))
        return {w.group: r for w, r in zip(workers, results, strict=True)}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "component": "workers"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        answers = await each("/readyz")
        detail = {group: (r.json() if r is not None else {"status": "unreachable"})
                  for group, r in answers.items()}
        ready = all(r is not None and r.status_code == 200 for r in answers.values())
        return JSONResponse({"status": "ready" if ready else "not_ready",
                             "component": "workers", "workers": detail},
                            status_code=200 if ready else 503)

    @app.get("/apply-delay")
    async def apply_delay() -> dict[str, Any]:
        """Each group's recent received -> applied delay (p50/p99), for `ringiflow lag`."""
        answers = await each("/apply-delay")
        return {group: (r.json() if r is not None and r.status_code == 200 else None)
                for group, r in answers.items()}

    @app.get("/metrics")
    async def metrics() -> Response:
        answers = await each("/metrics")
        body = "\n".join(r.text for r in answers.values() if r is not None)
        return Response(body, media_type="text/plain; version=0.0.4")

    return app

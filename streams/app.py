"""`ringiflow run workers`: one Faust worker process per projection (Faust runs
one app, so one consumer group, per process), supervised as `up` supervises its
components (infra.processes), behind one health endpoint: /healthz (alive), /readyz
(every worker ready), /metrics (all workers' metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse

from infra.processes import Child
from infra.servers import free_port
from infra.settings import Settings
from projectors.catalogue import CATALOGUE
from streams.services import SERVICES

log = logging.getLogger("ringiflow.workers")

# Below the supervisor's own grace for this process, so the workers are gone
# before it would SIGKILL us (and them, by the parent-death signal).
STOP_GRACE_S = 6.0


@dataclass(frozen=True)
class Worker:
    child: Child
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def worker(group: str, settings: Settings, taken: set[int]) -> Worker:
    """`taken`: ports this process listens on or already gave a worker. The ports
    are chosen before the supervisor binds its own, so a free port now can be its
    own port a moment later (a worker then fails to bind on every restart)."""
    port = free_port()
    while port in taken:
        port = free_port()
    taken.add(port)
    env = {**os.environ, "RINGIFLOW_WORKERS_HOST": "127.0.0.1"}
    # In this process's group, so whoever stops `run workers` can sweep the group.
    return Worker(Child(group, [sys.executable, "-m", "ringiflow", "projector", group,
                                "--port", str(port)], env,
                        settings.data_path / "logs" / f"worker-{group}.log", own_group=False),
                  port)


def create_app(settings: Settings) -> FastAPI:
    taken = {settings.workers_port}
    workers = [worker(group, settings, taken) for group in (*CATALOGUE, *SERVICES)]

    async def supervise() -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for w in workers:
                w.child.tend(now)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        for w in workers:
            w.child.start()
        task = asyncio.create_task(supervise())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.gather(*(asyncio.to_thread(w.child.stop, STOP_GRACE_S)
                                   for w in workers))

    app = FastAPI(title="RingiFlow workers", lifespan=lifespan)

    async def each(path: str) -> dict[str, httpx.Response | None]:
        async with httpx.AsyncClient(timeout=3) as client:
            async def one(worker: Worker) -> httpx.Response | None:
                try:
                    return await client.get(worker.url + path)
                except httpx.HTTPError:
                    return None
            results = await asyncio.gather(*(one(w) for w in workers))
        return {w.child.name: r for w, r in zip(workers, results, strict=True)}

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

"""The relay process: the relay loop plus /healthz, /readyz and /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from infra.clients import readiness_checks
from infra.service import health_router
from infra.settings import Settings
from relay.relay import Relay


def create_app(settings: Settings) -> FastAPI:
    relay = Relay(settings)

    async def relay_running() -> None:
        if not relay.running:
            raise RuntimeError("relay loop has no database session yet")
        if why := relay.blocked():
            raise RuntimeError(why)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(relay.run())
        try:
            yield
        finally:
            relay.stop.set()
            await asyncio.wait_for(task, 30)

    app = FastAPI(title="RingiFlow relay", lifespan=lifespan)
    checks = readiness_checks(settings, "relay", "kafka") | {"relay": relay_running}
    app.include_router(health_router("relay", checks))
    app.state.relay = relay
    return app

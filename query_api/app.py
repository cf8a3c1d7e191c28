"""The query API: read models over HTTP and WebSocket."""

from __future__ import annotations

from fastapi import FastAPI

from infra.clients import readiness_checks
from infra.service import service_app
from infra.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    return service_app("query-api", readiness_checks(settings, "query", "redis", "opensearch"))

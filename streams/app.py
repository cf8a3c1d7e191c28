"""The stream-processing workers: projectors and derived-topic processors."""

from __future__ import annotations

from fastapi import FastAPI

from infra.clients import readiness_checks
from infra.service import service_app
from infra.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    return service_app(
        "workers", readiness_checks(settings, "projector", "kafka", "redis", "opensearch")
    )

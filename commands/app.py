"""The command API: validates commands, decides events, appends them with
their outbox rows in one transaction."""

from __future__ import annotations

from fastapi import FastAPI

from infra.clients import readiness_checks
from infra.service import service_app
from infra.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    return service_app("command-api", readiness_checks(settings, "command"))

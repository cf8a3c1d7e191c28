"""The services that run as workers beside the projections: consumer groups that act
on what they read (deliver a notification, run a saga) instead of keeping a read
model. Each runs in the projections' worker (streams.worker: batches acknowledged only
once processed, a DLQ of its own, health and metrics) behind the same `Runner` shape
as `streams.processor.Processor`."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from psycopg_pool import AsyncConnectionPool

from contract import NOTIFICATION_COMMANDS, WORKFLOW_EVENTS
from infra.settings import Settings
from streams.deadletters import AnyRecord, DeadLetters


class Runner(Protocol):
    """What the worker drives: its topics, a start, and a batch processed in full
    (applied or dead-lettered) before it returns; `stop` set at shutdown."""

    stop: asyncio.Event

    @property
    def topics(self) -> tuple[str, ...]: ...

    async def start(self) -> None: ...

    async def process(self, records: Sequence[AnyRecord]) -> Any: ...


@dataclass(frozen=True)
class Service:
    group: str
    topics: tuple[str, ...]
    factory: str  # "module:function" (settings, dead letters, pool) -> Runner
    description: str

    def build(self, settings: Settings, dead_letters: DeadLetters,
              pool: AsyncConnectionPool) -> Runner:
        module, function = self.factory.split(":")
        runner: Runner = getattr(importlib.import_module(module), function)(
            settings, dead_letters, pool)
        return runner


SERVICES: dict[str, Service] = {s.group: s for s in (
    Service("notification-dispatcher", (NOTIFICATION_COMMANDS.name,),
            "notifications.runner:build", "delivers notification commands (email, chat)"),
    Service("workflow-completion-saga", (WORKFLOW_EVENTS.name,), "saga.runner:build",
            "completes approved workflows (finalize, notify, sync; compensates)"),
)}

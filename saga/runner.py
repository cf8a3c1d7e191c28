"""The `workflow-completion-saga` worker's runner. Reading the workflow events, it only
records a saga per approved workflow (durably, before the batch is acknowledged); an
executor in the same process then runs every unfinished saga step by step, saving each
step's outcome as soon as it is known, so a killed worker resumes where it was. Replayed
events start no saga (replays stay quiet) unless notifications on replay are asked for."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import httpx
import psycopg
from prometheus_client import Counter
from psycopg_pool import AsyncConnectionPool

import contract
from contract import WORKFLOW_EVENTS, EventName
from infra.kafka import producer
from infra.retry import Backoff
from infra.settings import Settings, libpq_url
from saga.steps import Effects, StepFailed, TryLater, run_step
from saga.store import COMPENSATION, FORWARD, Completion, Completions
from streams.deadletters import AnyRecord, DeadLetters, Failure, header, until_reachable
from streams.processor import REPLAY_HEADER

log = logging.getLogger("ringiflow.saga")

STEPS = Counter("ringiflow_saga_steps_total", "Completion saga steps by outcome",
                ["step", "outcome"])
FINISHED = Counter("ringiflow_sagas_finished_total", "Completion sagas by outcome", ["status"])
APPROVED = EventName.WORKFLOW_APPROVED.value
EXECUTOR_LOCK = 0x52696E6769_5361  # any constant of our own: "Ringi", "Sa"


def next_step(saga: Completion) -> str | None:
    """The step to run now: the first forward step without an outcome; once one failed,
    the compensation of each step done (not skipped), in reverse; then `record`."""
    if "record" in saga.steps:
        return None
    if saga.status == "running":
        pending = [s for s in FORWARD if s not in saga.steps]
        return pending[0] if pending else "record"
    done = [s for s in FORWARD if saga.steps.get(s, {}).get("status") == "done"]
    for step in reversed(done):
        if COMPENSATION[step] not in saga.steps:
            return COMPENSATION[step]
    return "record"


class SagaRunner:
    def __init__(self, settings: Settings, dead_letters: DeadLetters,
                 pool: AsyncConnectionPool) -> None:
        self.settings, self.dead_letters = settings, dead_letters
        self.completions = Completions(pool)
        self.stop = asyncio.Event()
        self.wake = asyncio.Event()
        self.backoff = Backoff(0.5, 10.0)
        self.task: asyncio.Task[None] | None = None
        self.effects: Effects | None = None

    @property
    def topics(self) -> tuple[str, ...]:
        return (WORKFLOW_EVENTS.name,)

    async def start(self) -> None:
        commands = AsyncConnectionPool(libpq_url(self.settings.role_database_url("command")),
                                       min_size=1, max_size=2, open=False)
        await commands.open(wait=True, timeout=30)
        self.effects = Effects(self.settings, commands,
                               producer(self.settings.require("kafka_bootstrap")),
                               httpx.AsyncClient(follow_redirects=False))
        self.task = asyncio.create_task(self.execute(), name="completion-saga")

    async def process(self, records: Sequence[AnyRecord]) -> None:
        started: list[tuple[UUID, UUID]] = []
        dead: list[Failure] = []
        quiet = not self.settings.replay_notifications
        for record in records:
            if header(record, "event_type") != APPROVED:
                continue
            if quiet and header(record, REPLAY_HEADER) == "true":
                continue  # a rebuild re-reads history: it completes nothing again
            try:
                envelope = contract.decode_envelope(record.value)
            except (contract.UndecodableRecord, contract.UnknownEventType,
                    contract.UnsupportedSchemaVersion) as exc:
                now = datetime.now(UTC)
                dead.append(Failure(record, exc, 1, now, now))
                continue
            started.append((envelope.tenant_id, envelope.aggregate_id))
        if dead:
            await self.dead_letters.send(dead)
        if started:
            new = await until_reachable("recording approved workflows",
                                        lambda: self.completions.start(started))
            if new:
                log.info("completion saga started for %d approved workflow(s)", new)
                self.wake.set()

    async def execute(self) -> None:
        """Run unfinished sagas until stopped; woken by new ones, else every second (a
        saga retried by an operator, one left by a crash). Only the process holding the
        executor lock runs them, so two saga workers never run one saga side by side;
        the lock goes with its session, so a killed worker's is free at once."""
        while not self.stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                        libpq_url(self.settings.role_database_url("projector")),
                        autocommit=True) as lock:
                    while not self.stop.is_set():
                        cur = await lock.execute("SELECT pg_try_advisory_lock(%s)",
                                                 (EXECUTOR_LOCK,))
                        if (await cur.fetchone() or (False,))[0]:
                            await self.run_unfinished()
                            return
                        await asyncio.sleep(1.0)
            except (psycopg.OperationalError, OSError) as exc:
                log.warning("completion saga: database unreachable (%s); trying again", exc)
                await asyncio.sleep(1.0)

    async def run_unfinished(self) -> None:
        while not self.stop.is_set():
            self.wake.clear()
            try:
                for saga in await self.completions.unfinished(self.settings.saga_step_attempts):
                    if self.stop.is_set():
                        return
                    await self.advance(saga)
            except (psycopg.OperationalError, OSError) as exc:
                log.warning("completion saga: database unreachable (%s); trying again", exc)
            except Exception:  # one saga's bug must not stop every other
                log.exception("completion saga: unexpected error; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 1.0)

    async def advance(self, saga: Completion) -> None:
        """Step `saga` forward until it finishes or a step runs out of attempts."""
        assert self.effects is not None
        saga.step = next_step(saga)
        while saga.step is not None and not self.stop.is_set():
            step = saga.step
            try:
                outcome = await asyncio.wait_for(run_step(self.effects, saga, step),
                                                 self.settings.saga_step_timeout_s * 3)
            except (TryLater, TimeoutError) as exc:
                saga.attempts += 1
                saga.last_error = f"{step}: {exc or 'timed out'}"
                STEPS.labels(step, "retry").inc()
                await self.completions.save(saga)
                if saga.attempts >= self.settings.saga_step_attempts:
                    log.error("completion of workflow %s: %s out of attempts (%s); waiting "
                              "for `ringiflow saga retry %s`", saga.workflow_id, step,
                              saga.last_error, saga.workflow_id)
                    return
                await asyncio.sleep(self.backoff.delay(saga.attempts))
                continue
            except StepFailed as exc:
                outcome = {"status": "failed", "error": str(exc)}
                if step in FORWARD:
                    saga.status = "compensating"
                    log.warning("completion of workflow %s failed at %s (%s); compensating",
                                saga.workflow_id, step, exc)
                elif step == "record":  # the workflow refused it: an operator must look
                    saga.attempts = self.settings.saga_step_attempts
                    saga.last_error = f"{step}: {exc}"
                    await self.completions.save(saga)
                    return
            self.record(saga, step, outcome)
            await self.completions.save(saga)

    def record(self, saga: Completion, step: str, outcome: dict[str, Any]) -> None:
        status = outcome.pop("status", "done")
        saga.steps[step] = {"status": status, "attempts": saga.attempts + 1,
                            "at": datetime.now(UTC).isoformat(), **outcome}
        STEPS.labels(step, status).inc()
        saga.attempts = 0
        if status == "failed":
            saga.last_error = f"{step}: {outcome.get('error')}"
        if step == "record":
            saga.status = "completed" if saga.status == "running" else "completion_failed"
            FINISHED.labels(saga.status).inc()
            log.info("completion of workflow %s: %s", saga.workflow_id, saga.status)
        saga.step = next_step(saga)


def build(settings: Settings, dead_letters: DeadLetters, pool: AsyncConnectionPool) -> Any:
    return SagaRunner(settings, dead_letters, pool)

"""The completion saga's order of steps as a pure function of what is recorded: forward
steps in turn, then on a failure the compensation of each step done, in reverse (a step
skipped or failed has nothing to undo), then the record; and the webhook signature."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import replace
from uuid import UUID, uuid4

from contract import record_headers
from infra.settings import Settings
from saga.runner import SagaRunner, next_step
from saga.steps import signature
from saga.store import Completion
from streams.deadletters import Record
from streams.processor import REPLAY_HEADER
from tests.scenarios import build_world


def walk(outcomes: dict[str, str]) -> list[str]:
    """The steps a saga takes when each step ends as `outcomes` says (default done)."""
    saga, taken = Completion(uuid4(), uuid4()), []
    while (step := next_step(saga)) is not None:
        taken.append(step)
        status = outcomes.get(step, "done")
        saga.steps[step] = {"status": status}
        if status == "failed" and step in ("finalize", "notify", "sync"):
            saga.status = "compensating"
    return taken


def test_a_saga_that_succeeds_runs_each_step_once_then_records() -> None:
    assert walk({}) == ["finalize", "notify", "sync", "record"]
    assert walk({"sync": "skipped"}) == ["finalize", "notify", "sync", "record"]


def test_a_failure_compensates_what_was_done_in_reverse() -> None:
    assert walk({"sync": "failed"}) == ["finalize", "notify", "sync", "correct", "unfinalize",
                                        "record"]
    assert walk({"notify": "failed"}) == ["finalize", "notify", "unfinalize", "record"]
    assert walk({"finalize": "failed"}) == ["finalize", "record"]


def test_a_resumed_saga_starts_at_its_first_step_without_an_outcome() -> None:
    saga = Completion(uuid4(), uuid4(), steps={"finalize": {"status": "done"},
                                               "notify": {"status": "done"}})
    assert next_step(saga) == "sync"
    saga.status, saga.steps["sync"] = "compensating", {"status": "failed"}
    saga.steps["correct"] = {"status": "done"}
    assert next_step(saga) == "unfinalize"


def test_the_webhook_signature_is_hmac_sha256_of_the_exact_body() -> None:
    body = b'{"event":"workflow.completed"}'
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert signature("s3cret", body) == f"sha256={expected}"
    assert signature("other", body) != signature("s3cret", body)


class Recorded:
    """Completions in memory: which sagas the runner asked to start."""

    def __init__(self) -> None:
        self.started: list[tuple[UUID, UUID]] = []

    async def start(self, started: list[tuple[UUID, UUID]]) -> int:
        self.started += started
        return len(started)


async def test_only_a_live_approval_starts_a_saga_and_replays_stay_quiet() -> None:
    world = build_world(workflows=12)
    approvals = [e for e in world.events if e.event_type == "WorkflowApproved"]
    assert approvals
    records = [Record("ringiflow.workflow.events", 0, n, str(e.aggregate_id).encode(),
                      e.model_dump_json().encode(), record_headers(e))
               for n, e in enumerate(world.events)]
    replayed = [replace(r, headers=(*r.headers, (REPLAY_HEADER, b"true"))) for r in records]

    for notify_on_replay, expected in ((False, 1), (True, 2)):
        runner = SagaRunner(Settings(replay_notifications=notify_on_replay),  # type: ignore[call-arg]
                            None, None)  # type: ignore[arg-type]
        runner.completions = Recorded()  # type: ignore[assignment]
        await runner.process(records)
        await runner.process(replayed)
        assert runner.completions.started == [  # type: ignore[attr-defined]
            (e.tenant_id, e.aggregate_id) for e in approvals] * expected

"""The completion saga's order of steps as a pure function of what is recorded: forward
steps in turn, then on a failure the compensation of each step done, in reverse (a step
skipped or failed has nothing to undo), then the record; and the webhook signature."""

from __future__ import annotations

import hashlib
import hmac
from uuid import uuid4

from saga.runner import next_step
from saga.steps import signature
from saga.store import Completion


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

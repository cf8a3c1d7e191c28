"""The user's notification preferences and the workflow's completion, as pure domain
logic: what each command emits, what it refuses, and that the state (and so every
snapshot) follows."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from uuid import uuid4

import orjson
import pytest

from commands.domain import (
    Actor,
    DomainError,
    FinalizeDocuments,
    Forbidden,
    InvalidCommand,
    InvalidState,
    NotFound,
    RecordCompletion,
    SetNotificationPreferences,
    UnfinalizeDocuments,
    UserState,
    WorkflowState,
    decide,
    fold,
)
from tests.unit.test_domain import ALICE, approved, in_progress, registered

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
SAGA = Actor(uuid4(), "completion saga", ("system",))


def run(state: WorkflowState | UserState, command: object, actor: Actor = SAGA):
    events = decide(command, state, actor, NOW)  # type: ignore[arg-type]
    return events, fold(state, events)


def test_preferences_are_set_and_carried_in_the_snapshot() -> None:
    user = registered()
    assert "locale" not in user.snapshot(), "a snapshot before preferences is unchanged"
    events, after = run(user, SetNotificationPreferences(
        "en", ("email", "chat"), "https://chat.example/hooks/T1"), ALICE)
    assert [e.event_type for e in events] == ["NotificationPreferencesSet"]
    snapshot = after.snapshot()
    assert (snapshot["locale"], snapshot["channels"], snapshot["chat_webhook_url"]) == \
        ("en", ["email", "chat"], "https://chat.example/hooks/T1")
    _, quiet = run(after, SetNotificationPreferences("ja", ()), ALICE)
    assert quiet.snapshot()["channels"] == [], "no channel at all opts out"


@pytest.mark.parametrize(("command", "error", "mentions"), [
    (SetNotificationPreferences("fr", ("email",)), InvalidCommand, "ja, en"),
    (SetNotificationPreferences("ja", ("sms",)), InvalidCommand, "email, chat"),
    (SetNotificationPreferences("ja", ("email", "email")), InvalidCommand, "at most once"),
    (SetNotificationPreferences("ja", ("chat",)), InvalidCommand, "chat_webhook_url"),
    (SetNotificationPreferences("ja", ("chat",), "ftp://x"), InvalidCommand, "http(s)"),
])
def test_preferences_refusals(command: SetNotificationPreferences, error: type[DomainError],
                              mentions: str) -> None:
    with pytest.raises(error, match=mentions.replace("(", r"\(").replace(")", r"\)")):
        decide(command, registered(), ALICE, NOW)
    with pytest.raises(NotFound):
        decide(SetNotificationPreferences("ja", ()), UserState(uuid4()), ALICE, NOW)


def test_finalizing_records_a_manifest_with_a_hash_over_it() -> None:
    workflow = approved()
    events, finalized = run(workflow, FinalizeDocuments())
    payload = events[0].payload
    assert payload["manifest"] == [
        {"document_id": str(d.document_id), "filename": d.filename, "sha256": d.sha256,
         "size_bytes": d.size_bytes} for d in workflow.documents]
    assert payload["manifest_sha256"] == hashlib.sha256(
        orjson.dumps(payload["manifest"], option=orjson.OPT_SORT_KEYS)).hexdigest()
    assert finalized.snapshot()["documents_finalized"] is True
    with pytest.raises(InvalidState, match="already finalized"):
        decide(FinalizeDocuments(), finalized, SAGA, NOW)


def test_completion_and_its_compensation() -> None:
    _, finalized = run(approved(), FinalizeDocuments())
    _, done = run(finalized, RecordCompletion(skipped_steps=("sync",)))
    assert done.snapshot()["completion"] == "completed"
    _, undone = run(finalized, UnfinalizeDocuments("sync refused"))
    _, failed = run(undone, RecordCompletion(failed_step="sync", reason="400 Bad Request"))
    snapshot = failed.snapshot()
    assert (snapshot["documents_finalized"], snapshot["completion"],
            snapshot["completion_error"]) == (False, "completion_failed", "sync: 400 Bad Request")
    with pytest.raises(InvalidState, match="already completed"):
        decide(RecordCompletion(), done, SAGA, NOW)
    # An operator's `saga retry` runs a failed completion again, to the end.
    _, again = run(failed, FinalizeDocuments())
    _, retried = run(again, RecordCompletion())
    assert (retried.snapshot()["completion"], retried.snapshot()["completion_error"]) == \
        ("completed", None)


def test_only_the_saga_completes_and_only_an_approved_workflow() -> None:
    with pytest.raises(Forbidden, match="completion saga"):
        decide(FinalizeDocuments(), approved(), ALICE, NOW)
    with pytest.raises(InvalidState, match="only an approved"):
        decide(FinalizeDocuments(), in_progress(), SAGA, NOW)
    with pytest.raises(InvalidState, match="not finalized"):
        decide(UnfinalizeDocuments("x"), approved(), SAGA, NOW)

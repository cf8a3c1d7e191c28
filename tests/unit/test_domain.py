"""The pure domain: every transition, every refusal, fold/decide round trips,
JSON-safe payloads and snapshots, and that decide never touches its inputs."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest

import contract
from commands.domain import (
    MAX_NAME_LENGTH,
    MAX_TEXT_LENGTH,
    MAX_TITLE_LENGTH,
    Actor,
    AddComment,
    AlreadyExists,
    ApproveStep,
    AttachDocument,
    CancelWorkflow,
    Command,
    CreateDefinition,
    CreateWorkflow,
    Decision,
    DefinitionState,
    DelegateStep,
    DocumentInfo,
    DomainError,
    DomainEvent,
    FinalizeDocuments,
    Forbidden,
    InvalidCommand,
    InvalidState,
    NotFound,
    Priority,
    RecordCompletion,
    RegisterUser,
    RejectStep,
    RenameUser,
    RequestChanges,
    ResolvedStep,
    ResubmitWorkflow,
    SetNotificationPreferences,
    StepStatus,
    StepTemplate,
    SubmitWorkflow,
    UnfinalizeDocuments,
    UserState,
    WorkflowState,
    WorkflowStatus,
    decide,
    evolve,
    fold,
    initial_state,
    resolve_steps,
)

NOW = datetime(2026, 4, 1, 9, 0, tzinfo=UTC)
LATER = NOW + timedelta(hours=1)

ALICE = Actor(uuid4(), "Alice", ("member",))  # the initiator
BOB = Actor(uuid4(), "Bob")  # step 1
CAROL = Actor(uuid4(), "Carol")  # step 2
DAVE = Actor(uuid4(), "Dave")  # bystander / delegate

State = Any  # UserState | DefinitionState | WorkflowState


def apply(
    state: State, command: Command, actor: Actor, now: datetime = NOW
) -> tuple[list[DomainEvent], State]:
    """decide + evolve, checking on the way the properties every command must keep."""
    before, before_snapshot = copy.deepcopy(state), state.snapshot()
    events = decide(command, state, actor, now)
    assert state == before and state.snapshot() == before_snapshot  # decide is pure
    assert events, "an accepted command always emits events"
    after = state
    for event in events:
        assert isinstance(event, DomainEvent)
        json.dumps(event.payload)
        after = evolve(after, event)
        json.dumps(after.snapshot())
    assert after.version == state.version + len(events)
    assert fold(state, events) == after
    # Events come back from the store as JSON: folding the decoded payloads gives the same state.
    decoded = [DomainEvent(e.event_type, json.loads(json.dumps(e.payload))) for e in events]
    assert fold(state, decoded) == after
    assert decide(command, state, actor, now) == events  # deterministic
    return events, after


def refuse(state: State, command: Command, actor: Actor, error: type[DomainError]) -> str:
    before = copy.deepcopy(state)
    with pytest.raises(error) as raised:
        decide(command, state, actor, NOW)
    assert type(raised.value) is error
    assert raised.value.code == error.code
    assert state == before
    return str(raised.value)


def types(events: list[DomainEvent]) -> list[str]:
    return [e.event_type for e in events]


# --- builders ----------------------------------------------------------------------


def registered(name: str = "Alice", email: str = "alice@example.com") -> UserState:
    _, state = apply(UserState(uuid4()), RegisterUser(name, email), ALICE)
    return state


def defined() -> DefinitionState:
    command = CreateDefinition(
        "Purchase", (StepTemplate("Manager", BOB.user_id), StepTemplate("CFO", CAROL.user_id))
    )
    _, state = apply(DefinitionState(uuid4()), command, ALICE)
    return state


def create_command(**overrides: Any) -> CreateWorkflow:
    fields: dict[str, Any] = {
        "definition_id": uuid4(),
        "definition_name": "Purchase",
        "steps": (
            ResolvedStep("Manager", BOB.user_id, BOB.name),
            ResolvedStep("CFO", CAROL.user_id, CAROL.name),
        ),
        "title": "稟議: new laptops",
        "description": "Three laptops for the new team",
        "priority": Priority.HIGH,
        "due_date": NOW + timedelta(days=7),
    }
    fields.update(overrides)
    return CreateWorkflow(**fields)


def draft(**overrides: Any) -> WorkflowState:
    _, state = apply(WorkflowState(uuid4()), create_command(**overrides), ALICE)
    return state


def in_progress() -> WorkflowState:
    _, state = apply(draft(), SubmitWorkflow(), ALICE)
    return state


def at_second_step() -> WorkflowState:
    state = in_progress()
    _, state = apply(state, ApproveStep(state.steps[0].step_id), BOB)
    return state


def changes_requested() -> WorkflowState:
    state = in_progress()
    _, state = apply(state, RequestChanges(state.steps[0].step_id, "Add a quote"), BOB)
    return state


def approved() -> WorkflowState:
    state = at_second_step()
    _, state = apply(state, ApproveStep(state.steps[1].step_id), CAROL)
    return state


def rejected() -> WorkflowState:
    state = in_progress()
    _, state = apply(state, RejectStep(state.steps[0].step_id, "Too expensive"), BOB)
    return state


def cancelled() -> WorkflowState:
    _, state = apply(in_progress(), CancelWorkflow("No longer needed"), ALICE)
    return state


def document(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "document_id": uuid4(),
        "filename": "quote.pdf",
        "content_type": "application/pdf",
        "size_bytes": 12_345,
        "sha256": "AB" * 32,
        "url": "s3://ringiflow-docs/quote.pdf",
    }
    fields.update(overrides)
    return fields


# --- users -------------------------------------------------------------------------


def test_register_user() -> None:
    state = UserState(uuid4())
    events, after = apply(state, RegisterUser("  Alice  ", "alice@example.com"), ALICE)
    assert types(events) == ["UserRegistered"]
    assert events[0].payload == {
        "user_id": str(state.id),
        "display_name": "Alice",
        "email": "alice@example.com",
        "registered_at": NOW.isoformat(),
        "actor_id": str(ALICE.user_id),
        "actor_name": "Alice",
    }
    assert after.snapshot() == {
        "id": str(state.id),
        "version": 1,
        "display_name": "Alice",
        "email": "alice@example.com",
        "registered_at": NOW.isoformat(),
        "updated_at": NOW.isoformat(),
    }


def test_register_user_twice_is_refused() -> None:
    message = refuse(registered(), RegisterUser("Alice", "a@example.com"), ALICE, AlreadyExists)
    assert "RenameUser" in message


@pytest.mark.parametrize(
    ("display_name", "email"),
    [(" ", "a@example.com"), ("x" * (MAX_NAME_LENGTH + 1), "a@example.com"), ("A", "not-mail")],
    ids=["blank-name", "long-name", "bad-email"],
)
def test_register_user_validates(display_name: str, email: str) -> None:
    refuse(UserState(uuid4()), RegisterUser(display_name, email), ALICE, InvalidCommand)


def test_rename_user() -> None:
    state = registered()
    events, after = apply(state, RenameUser("Alice Suzuki"), ALICE, LATER)
    assert types(events) == ["UserRenamed"]
    assert events[0].payload["old_display_name"] == "Alice"
    assert events[0].payload["display_name"] == "Alice Suzuki"
    assert after.display_name == "Alice Suzuki"
    assert after.snapshot()["updated_at"] == LATER.isoformat()
    assert after.registered_at == NOW


def test_rename_user_refusals() -> None:
    refuse(UserState(uuid4()), RenameUser("Bob"), ALICE, NotFound)
    assert "already named" in refuse(registered(), RenameUser(" Alice "), ALICE, InvalidCommand)
    refuse(registered(), RenameUser(""), ALICE, InvalidCommand)


# --- definitions -------------------------------------------------------------------


def test_create_definition() -> None:
    state = DefinitionState(uuid4())
    command = CreateDefinition(
        " Purchase ",
        (StepTemplate("Manager", BOB.user_id), StepTemplate("CFO", CAROL.user_id)),
        description=" ",
    )
    events, after = apply(state, command, ALICE)
    assert types(events) == ["DefinitionCreated"]
    assert events[0].payload["steps"] == [
        {"order": 1, "name": "Manager", "assignee_id": str(BOB.user_id)},
        {"order": 2, "name": "CFO", "assignee_id": str(CAROL.user_id)},
    ]
    snapshot = after.snapshot()
    assert snapshot["name"] == "Purchase"
    assert snapshot["description"] is None
    assert snapshot["created_by_id"] == str(ALICE.user_id)
    assert snapshot["steps"] == events[0].payload["steps"]
    assert after.steps == command.steps


def test_create_definition_refusals() -> None:
    step = (StepTemplate("Manager", BOB.user_id),)
    refuse(defined(), CreateDefinition("Again", step), ALICE, AlreadyExists)
    empty = DefinitionState(uuid4())
    assert "at least one step" in refuse(empty, CreateDefinition("P", ()), ALICE, InvalidCommand)
    refuse(empty, CreateDefinition(" ", step), ALICE, InvalidCommand)
    blank_step = (StepTemplate(" ", BOB.user_id),)
    assert "step 1" in refuse(empty, CreateDefinition("P", blank_step), ALICE, InvalidCommand)


def test_resolve_steps() -> None:
    definition = defined()
    names = {BOB.user_id: "Bob", CAROL.user_id: "Carol"}
    assert resolve_steps(definition, names) == (
        ResolvedStep("Manager", BOB.user_id, "Bob"),
        ResolvedStep("CFO", CAROL.user_id, "Carol"),
    )
    with pytest.raises(NotFound, match="register the user"):
        resolve_steps(definition, {BOB.user_id: "Bob"})
    with pytest.raises(NotFound, match="CreateDefinition"):
        resolve_steps(DefinitionState(uuid4()), names)


# --- workflow creation -------------------------------------------------------------


def test_create_workflow() -> None:
    state = WorkflowState(uuid4())
    doc = document()
    command = create_command(priority="urgent", documents=(DocumentInfo(**doc),))
    events, after = apply(state, command, ALICE)
    assert types(events) == ["WorkflowCreated"]
    payload = events[0].payload
    assert set(payload) == {
        "workflow_id", "title", "description", "priority", "due_date", "definition_id",
        "definition_name", "initiator_id", "initiator_name", "steps", "documents",
        "created_at", "actor_id", "actor_name",
    }  # fmt: skip
    assert payload["priority"] == "urgent"
    assert payload["initiator_name"] == "Alice"
    assert payload["due_date"] == (NOW + timedelta(days=7)).isoformat()
    assert [(s["order"], s["name"], s["assignee_name"]) for s in payload["steps"]] == [
        (1, "Manager", "Bob"),
        (2, "CFO", "Carol"),
    ]
    assert payload["documents"][0]["sha256"] == "ab" * 32  # normalised to lower case
    assert after.status is WorkflowStatus.DRAFT
    assert [s.status for s in after.steps] == [StepStatus.WAITING, StepStatus.WAITING]
    assert [str(s.step_id) for s in after.steps] == [s["step_id"] for s in payload["steps"]]
    assert len({s.step_id for s in after.steps}) == 2
    snapshot = after.snapshot()
    assert snapshot["status"] == "draft"
    assert snapshot["current_step_id"] is None
    assert snapshot["documents"][0]["attached_by_id"] == str(ALICE.user_id)
    assert snapshot["documents"][0]["document_id"] == str(doc["document_id"])


def test_create_workflow_twice_is_refused() -> None:
    refuse(draft(), create_command(), ALICE, AlreadyExists)


@pytest.mark.parametrize(
    ("overrides", "mentions"),
    [
        ({"title": "  "}, "title"),
        ({"title": "x" * (MAX_TITLE_LENGTH + 1)}, "title"),
        ({"definition_name": ""}, "definition_name"),
        ({"priority": "critical"}, "priority"),
        ({"due_date": datetime(2026, 5, 1)}, "time zone"),
        ({"due_date": NOW - timedelta(minutes=1)}, "past"),
        ({"steps": ()}, "at least one step"),
        ({"steps": (ResolvedStep("Manager", BOB.user_id, " "),)}, "assignee_name"),
        ({"description": "x" * (MAX_TEXT_LENGTH + 1)}, "description"),
        ({"documents": (DocumentInfo(**document(filename="../etc/passwd")),)}, "filename"),
    ],
    ids=[
        "blank-title", "long-title", "blank-definition-name", "unknown-priority",
        "naive-due-date", "past-due-date", "no-steps", "blank-assignee-name",
        "long-description", "document-path",
    ],
)  # fmt: skip
def test_create_workflow_validates(overrides: dict[str, Any], mentions: str) -> None:
    command = create_command(**overrides)
    assert mentions in refuse(WorkflowState(uuid4()), command, ALICE, InvalidCommand)


def test_create_workflow_refuses_repeated_document_ids() -> None:
    doc = DocumentInfo(**document())
    command = create_command(documents=(doc, doc))
    refuse(WorkflowState(uuid4()), command, ALICE, InvalidCommand)


# --- submit ------------------------------------------------------------------------


def test_submit_assigns_the_first_step() -> None:
    state = draft()
    events, after = apply(state, SubmitWorkflow(), ALICE, LATER)
    assert types(events) == ["WorkflowSubmitted", "WorkflowStepAssigned"]
    assigned = events[1].payload
    assert assigned == {
        "workflow_id": str(state.id),
        "workflow_title": state.title,
        "initiator_id": str(ALICE.user_id),
        "step_id": str(state.steps[0].step_id),
        "step_name": "Manager",
        "order": 1,
        "assignee_id": str(BOB.user_id),
        "assignee_name": "Bob",
        "due_date": (NOW + timedelta(days=7)).isoformat(),
        "priority": "high",
        "reason": "submitted",
        "assigned_at": LATER.isoformat(),
        "actor_id": str(ALICE.user_id),
        "actor_name": "Alice",
    }
    assert after.status is WorkflowStatus.IN_PROGRESS
    assert after.submitted_at == LATER
    assert [s.status for s in after.steps] == [StepStatus.PENDING, StepStatus.WAITING]
    snapshot = after.snapshot()
    assert snapshot["current_step_id"] == str(state.steps[0].step_id)
    assert snapshot["current_assignee_name"] == "Bob"
    assert snapshot["updated_at"] == LATER.isoformat()


def test_submit_refusals() -> None:
    refuse(WorkflowState(uuid4()), SubmitWorkflow(), ALICE, NotFound)
    assert "Alice" in refuse(draft(), SubmitWorkflow(), BOB, Forbidden)
    assert "already being reviewed" in refuse(in_progress(), SubmitWorkflow(), ALICE, InvalidState)
    refuse(changes_requested(), SubmitWorkflow(), ALICE, InvalidState)


# --- approve -----------------------------------------------------------------------


def test_approve_moves_to_the_next_step() -> None:
    state = in_progress()
    first, second = state.steps
    events, after = apply(state, ApproveStep(first.step_id, " LGTM "), BOB, LATER)
    assert types(events) == ["WorkflowStepCompleted", "WorkflowStepAssigned"]
    completed = events[0].payload
    assert completed["decision"] == "approved"
    assert completed["comment"] == "LGTM"
    assert completed["next_step_id"] == str(second.step_id)
    assert (completed["actor_id"], completed["actor_name"]) == (str(BOB.user_id), "Bob")
    assert events[1].payload["step_id"] == str(second.step_id)
    assert events[1].payload["reason"] == "advanced"
    assert after.status is WorkflowStatus.IN_PROGRESS
    assert after.current_step_id == second.step_id
    assert after.steps[0].status is StepStatus.APPROVED
    assert after.steps[0].decided_at == LATER
    assert after.steps[1].status is StepStatus.PENDING


def test_approving_the_last_step_approves_the_workflow() -> None:
    state = at_second_step()
    events, after = apply(state, ApproveStep(state.steps[1].step_id), CAROL, LATER)
    assert types(events) == ["WorkflowStepCompleted", "WorkflowApproved"]
    assert events[0].payload["next_step_id"] is None
    assert {"completed_at", "actor_id", "actor_name", "workflow_title"} <= set(events[1].payload)
    assert events[1].payload["actor_name"] == "Carol"
    assert after.status is WorkflowStatus.APPROVED
    assert after.completed_at == LATER
    assert after.snapshot()["current_step_id"] is None
    assert [s.status for s in after.steps] == [StepStatus.APPROVED, StepStatus.APPROVED]


def test_step_decision_refusals() -> None:
    state = in_progress()
    first, second = state.steps
    refuse(WorkflowState(uuid4()), ApproveStep(first.step_id), BOB, NotFound)
    assert "submit it first" in refuse(draft(), ApproveStep(uuid4()), BOB, InvalidState)
    assert "no step" in refuse(state, ApproveStep(uuid4()), BOB, InvalidCommand)
    message = refuse(state, ApproveStep(second.step_id), CAROL, InvalidState)
    assert "current step 'Manager'" in message
    assert "Bob" in refuse(state, ApproveStep(first.step_id), ALICE, Forbidden)
    pending_changes = changes_requested()
    step_id = pending_changes.steps[0].step_id
    assert "resubmit" in refuse(pending_changes, ApproveStep(step_id), BOB, InvalidState)


@pytest.mark.parametrize(
    "make",
    [
        lambda step_id: ApproveStep(step_id),
        lambda step_id: RejectStep(step_id, "no"),
        lambda step_id: RequestChanges(step_id, "fix"),
        lambda step_id: DelegateStep(step_id, DAVE.user_id, DAVE.name),
    ],
    ids=["approve", "reject", "request-changes", "delegate"],
)
def test_only_the_current_assignee_decides(make: Callable[[UUID], Command]) -> None:
    state = in_progress()
    for outsider in (ALICE, CAROL, DAVE):
        refuse(state, make(state.steps[0].step_id), outsider, Forbidden)


# --- reject / request changes / resubmit ----------------------------------------------


def test_reject_rejects_the_workflow_and_skips_the_rest() -> None:
    state = in_progress()
    first, second = state.steps
    events, after = apply(state, RejectStep(first.step_id, " Too expensive "), BOB, LATER)
    assert types(events) == ["WorkflowStepCompleted", "WorkflowRejected"]
    assert events[0].payload["decision"] == "rejected"
    rejected_payload = events[1].payload
    assert rejected_payload["comment"] == "Too expensive"
    assert rejected_payload["skipped_step_ids"] == [str(second.step_id)]
    assert rejected_payload["completed_at"] == LATER.isoformat()
    assert rejected_payload["actor_id"] == str(BOB.user_id)
    assert after.status is WorkflowStatus.REJECTED
    assert after.completed_at == LATER
    assert after.current_step_id is None
    assert [s.status for s in after.steps] == [StepStatus.REJECTED, StepStatus.SKIPPED]
    assert after.steps[0].comment == "Too expensive"


def test_reject_and_request_changes_need_a_comment() -> None:
    state = in_progress()
    step_id = state.steps[0].step_id
    assert "comment is required" in refuse(state, RejectStep(step_id, " "), BOB, InvalidCommand)
    refuse(state, RequestChanges(step_id, ""), BOB, InvalidCommand)
    refuse(state, RejectStep(step_id, "x" * (MAX_TEXT_LENGTH + 1)), BOB, InvalidCommand)


def test_request_changes_returns_the_workflow_to_the_initiator() -> None:
    state = at_second_step()
    second = state.steps[1]
    events, after = apply(state, RequestChanges(second.step_id, "Add a quote"), CAROL)
    assert types(events) == ["WorkflowStepCompleted"]
    assert events[0].payload["decision"] == "changes_requested"
    assert events[0].payload["initiator_id"] == str(ALICE.user_id)
    assert after.status is WorkflowStatus.CHANGES_REQUESTED
    assert after.current_step_id == second.step_id  # waits for the resubmit
    assert after.steps[1].status is StepStatus.CHANGES_REQUESTED
    assert after.snapshot()["status"] == "changes_requested"


def test_resubmit_reassigns_the_step_that_asked_for_changes() -> None:
    state = changes_requested()
    first = state.steps[0]
    events, after = apply(state, ResubmitWorkflow(" Quote attached "), ALICE, LATER)
    assert types(events) == ["WorkflowResubmitted", "WorkflowStepAssigned"]
    assert events[0].payload["step_id"] == str(first.step_id)
    assert events[0].payload["comment"] == "Quote attached"
    assert events[1].payload["assignee_id"] == str(BOB.user_id)
    assert events[1].payload["reason"] == "resubmitted"
    assert after.status is WorkflowStatus.IN_PROGRESS
    assert after.current_step_id == first.step_id
    step = after.steps[0]
    assert (step.status, step.decision, step.comment) == (StepStatus.PENDING, None, None)
    assert step.assigned_at == LATER
    _, after = apply(after, ApproveStep(first.step_id), BOB)  # the review goes on
    assert after.current_step_id == after.steps[1].step_id


def test_resubmit_refusals() -> None:
    refuse(WorkflowState(uuid4()), ResubmitWorkflow(), ALICE, NotFound)
    refuse(changes_requested(), ResubmitWorkflow(), BOB, Forbidden)
    refuse(in_progress(), ResubmitWorkflow(), ALICE, InvalidState)
    refuse(draft(), ResubmitWorkflow(), ALICE, InvalidState)


# --- delegate ----------------------------------------------------------------------


def test_delegate_keeps_the_step_current_with_a_new_assignee() -> None:
    state = in_progress()
    first = state.steps[0]
    command = DelegateStep(first.step_id, DAVE.user_id, " Dave ", "On leave")
    events, after = apply(state, command, BOB, LATER)
    assert types(events) == ["WorkflowStepCompleted", "WorkflowStepAssigned"]
    completed, assigned = (e.payload for e in events)
    assert completed["decision"] == "delegated"
    assert (completed["delegate_to_id"], completed["delegate_to_name"]) == (
        str(DAVE.user_id),
        "Dave",
    )
    assert completed["comment"] == "On leave"
    assert assigned["step_id"] == str(first.step_id)
    assert (assigned["assignee_id"], assigned["reason"]) == (str(DAVE.user_id), "delegated")

    between = evolve(state, events[0])  # the snapshot stored with the first event
    assert between.steps[0].status is StepStatus.DELEGATED
    assert between.snapshot()["steps"][0]["decision"] == "delegated"

    step = after.steps[0]
    assert after.current_step_id == first.step_id
    assert (step.assignee_id, step.assignee_name) == (DAVE.user_id, "Dave")
    assert (step.status, step.decision) == (StepStatus.PENDING, None)
    assert step.delegated_from == (BOB.user_id,)
    assert after.snapshot()["current_assignee_name"] == "Dave"

    refuse(after, ApproveStep(first.step_id), BOB, Forbidden)
    _, after = apply(after, DelegateStep(first.step_id, CAROL.user_id, "Carol"), DAVE)
    assert after.steps[0].delegated_from == (BOB.user_id, DAVE.user_id)
    _, after = apply(after, ApproveStep(first.step_id), CAROL)
    assert after.steps[0].status is StepStatus.APPROVED


def test_delegate_refusals() -> None:
    state = in_progress()
    step_id = state.steps[0].step_id
    to_self = DelegateStep(step_id, BOB.user_id, "Bob")
    assert "another user" in refuse(state, to_self, BOB, InvalidCommand)
    refuse(state, DelegateStep(step_id, DAVE.user_id, " "), BOB, InvalidCommand)
    refuse(draft(), DelegateStep(step_id, DAVE.user_id, "Dave"), BOB, InvalidState)


# --- cancel ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "skipped"),
    [(draft, [0, 1]), (in_progress, [0, 1]), (at_second_step, [1]), (changes_requested, [1])],
    ids=["draft", "in-progress", "second-step", "changes-requested"],
)
def test_cancel_from_any_open_status(make: Callable[[], WorkflowState], skipped: list[int]) -> None:
    state = make()
    events, after = apply(state, CancelWorkflow(" Budget cut "), ALICE, LATER)
    assert types(events) == ["WorkflowCancelled"]
    payload = events[0].payload
    assert payload["reason"] == "Budget cut"
    assert payload["previous_status"] == state.status
    assert payload["skipped_step_ids"] == [str(state.steps[i].step_id) for i in skipped]
    assert after.status is WorkflowStatus.CANCELLED
    assert (after.cancelled_at, after.cancel_reason, after.completed_at) == (
        LATER,
        "Budget cut",
        None,
    )
    assert after.current_step_id is None
    assert all(after.steps[i].status is StepStatus.SKIPPED for i in skipped)
    assert after.snapshot()["status"] == "cancelled"


def test_cancel_without_reason() -> None:
    events, after = apply(draft(), CancelWorkflow(), ALICE)
    assert events[0].payload["reason"] is None
    assert after.cancel_reason is None


def test_cancel_refusals() -> None:
    refuse(WorkflowState(uuid4()), CancelWorkflow(), ALICE, NotFound)
    assert "only the initiator" in refuse(in_progress(), CancelWorkflow(), BOB, Forbidden)


# --- comments and documents -----------------------------------------------------------


@pytest.mark.parametrize("make", [draft, in_progress, changes_requested])
def test_add_comment(make: Callable[[], WorkflowState]) -> None:
    state = make()
    events, after = apply(state, AddComment(" Looks fine "), DAVE, LATER)
    assert types(events) == ["CommentAdded"]
    payload = events[0].payload
    assert (payload["body"], payload["actor_name"]) == ("Looks fine", "Dave")
    assert after.status == state.status
    comment = after.comments[-1]
    assert (str(comment.comment_id), comment.author_id) == (payload["comment_id"], DAVE.user_id)
    assert after.snapshot()["comments"][-1]["body"] == "Looks fine"
    _, again = apply(after, AddComment("Second"), DAVE)
    assert again.comments[0].comment_id != again.comments[1].comment_id


def test_a_snapshot_built_once_per_part_still_follows_every_change() -> None:
    """Steps, comments and documents keep their snapshot (built_once): a changed part
    is a new value with its own, and a caller editing one event's snapshot leaves the
    next event's alone."""
    state = in_progress()
    _, commented = apply(state, AddComment("first"), DAVE)
    first = commented.snapshot()
    first["comments"][0]["body"] = "edited by a caller"
    first["steps"][0]["status"] = "edited by a caller"
    _, approved = apply(commented, ApproveStep(state.steps[0].step_id, "ok"), BOB, LATER)
    again = approved.snapshot()
    assert again["comments"][0]["body"] == "first"
    assert [(s["status"], s["decision"], s["comment"]) for s in again["steps"]] == [
        ("approved", "approved", "ok"), ("pending", None, None)]
    assert again["steps"][0]["decided_at"] == LATER.isoformat()
    assert approved.comments[0] is commented.comments[0]  # the part itself carried over
    assert approved.snapshot() == again == copy.deepcopy(approved).snapshot()


def test_add_comment_refusals() -> None:
    refuse(WorkflowState(uuid4()), AddComment("hi"), ALICE, NotFound)
    refuse(draft(), AddComment("  "), ALICE, InvalidCommand)


@pytest.mark.parametrize("make", [draft, in_progress, changes_requested])
def test_attach_document(make: Callable[[], WorkflowState]) -> None:
    state = make()
    doc = document(sha256=None, url=None, content_type="Text/Plain; charset=utf-8")
    events, after = apply(state, AttachDocument(**doc), BOB, LATER)
    assert types(events) == ["DocumentAttached"]
    payload = events[0].payload
    assert payload["content_type"] == "text/plain; charset=utf-8"
    assert (payload["sha256"], payload["url"]) == (None, None)
    assert payload["attached_at"] == LATER.isoformat()
    attached = after.documents[-1]
    assert (attached.document_id, attached.attached_by_id) == (doc["document_id"], BOB.user_id)
    assert after.snapshot()["documents"][-1]["filename"] == "quote.pdf"


@pytest.mark.parametrize(
    "overrides",
    [
        {"filename": " "},
        {"filename": "C:\\docs\\quote.pdf"},
        {"content_type": "pdf"},
        {"size_bytes": -1},
        {"size_bytes": True},
        {"sha256": "abc"},
    ],
    ids=["blank-filename", "path", "content-type", "negative-size", "bool-size", "sha256"],
)
def test_attach_document_validates(overrides: dict[str, Any]) -> None:
    refuse(draft(), AttachDocument(**document(**overrides)), ALICE, InvalidCommand)


def test_attach_document_refusals() -> None:
    doc = document()
    _, state = apply(draft(), AttachDocument(**doc), ALICE)
    assert "new document_id" in refuse(state, AttachDocument(**doc), ALICE, AlreadyExists)
    refuse(WorkflowState(uuid4()), AttachDocument(**document()), ALICE, NotFound)


# --- terminal workflows -------------------------------------------------------------

WORKFLOW_COMMANDS: dict[str, Callable[[WorkflowState], Command]] = {
    "submit": lambda s: SubmitWorkflow(),
    "resubmit": lambda s: ResubmitWorkflow(),
    "approve": lambda s: ApproveStep(s.steps[0].step_id),
    "reject": lambda s: RejectStep(s.steps[0].step_id, "no"),
    "request-changes": lambda s: RequestChanges(s.steps[0].step_id, "fix"),
    "delegate": lambda s: DelegateStep(s.steps[0].step_id, DAVE.user_id, "Dave"),
    "cancel": lambda s: CancelWorkflow(),
    "comment": lambda s: AddComment("late"),
    "attach": lambda s: AttachDocument(**document()),
}


@pytest.mark.parametrize("make", [approved, rejected, cancelled])
@pytest.mark.parametrize("command", WORKFLOW_COMMANDS.values(), ids=WORKFLOW_COMMANDS.keys())
def test_terminal_workflows_refuse_every_command(
    make: Callable[[], WorkflowState], command: Callable[[WorkflowState], Command]
) -> None:
    state = make()
    # Even the initiator and the assignee are refused: nothing may change a closed workflow.
    for actor in (ALICE, BOB):
        assert "can no longer change" in refuse(state, command(state), actor, InvalidState)


# --- round trips, purity, plumbing ---------------------------------------------------


def test_fold_replays_a_whole_history() -> None:
    state = WorkflowState(uuid4())
    history: list[DomainEvent] = []
    steps: list[tuple[Callable[[WorkflowState], Command], Actor]] = [
        (lambda s: create_command(), ALICE),
        (lambda s: AddComment("please review"), ALICE),
        (lambda s: SubmitWorkflow(), ALICE),
        (lambda s: DelegateStep(s.steps[0].step_id, DAVE.user_id, "Dave"), BOB),
        (lambda s: RequestChanges(s.steps[0].step_id, "quote?"), DAVE),
        (lambda s: AttachDocument(**document()), ALICE),
        (lambda s: ResubmitWorkflow(), ALICE),
        (lambda s: ApproveStep(s.steps[0].step_id), DAVE),
        (lambda s: ApproveStep(s.steps[1].step_id, "ok"), CAROL),
    ]
    for make, actor in steps:
        events, state = apply(state, make(state), actor)
        history.extend(events)
    assert state.status is WorkflowStatus.APPROVED
    replayed = fold(WorkflowState(state.id), history)
    assert replayed == state
    assert replayed.version == len(history) == 14
    assert json.loads(json.dumps(replayed.snapshot())) == state.snapshot()
    assert state.steps[0].delegated_from == (BOB.user_id,)
    assert (len(state.comments), len(state.documents)) == (1, 1)


def test_snapshots_are_json_and_reflect_the_state() -> None:
    for state in (registered(), defined(), in_progress(), approved(), cancelled()):
        snapshot = state.snapshot()
        assert json.loads(json.dumps(snapshot)) == snapshot
        assert snapshot["id"] == str(state.id)
        assert snapshot["version"] == state.version
    assert in_progress().snapshot()["steps"][0]["status"] == "pending"


def test_every_event_type_matches_the_contract() -> None:
    emitted: dict[str, str] = {}

    def collect(aggregate_type: str, events: list[DomainEvent]) -> None:
        emitted.update({e.event_type: aggregate_type for e in events})

    new_user = UserState(uuid4())
    collect("user", decide(RegisterUser("A", "a@example.com"), new_user, ALICE, NOW))
    collect("user", decide(RenameUser("B"), registered(), ALICE, NOW))
    collect("user", decide(SetNotificationPreferences("en", ("email",)), registered(), ALICE,
                           NOW))
    new_definition = DefinitionState(uuid4())
    create = CreateDefinition("D", (StepTemplate("S", BOB.user_id),))
    collect("definition", decide(create, new_definition, ALICE, NOW))
    workflow_commands: list[tuple[WorkflowState, Callable[[WorkflowState], Command], Actor]] = [
        (WorkflowState(uuid4()), lambda s: create_command(), ALICE),
        (draft(), lambda s: SubmitWorkflow(), ALICE),
        (at_second_step(), lambda s: ApproveStep(s.steps[1].step_id), CAROL),
        (changes_requested(), lambda s: ResubmitWorkflow(), ALICE),
        (in_progress(), lambda s: RejectStep(s.steps[0].step_id, "no"), BOB),
        (draft(), lambda s: CancelWorkflow(), ALICE),
        (draft(), lambda s: AddComment("c"), ALICE),
        (draft(), lambda s: AttachDocument(**document()), ALICE),
    ]
    for state, make, actor in workflow_commands:
        collect("workflow", decide(make(state), state, actor, NOW))
    saga = Actor(uuid4(), "completion saga", ("system",))
    finalized = fold(approved(), decide(FinalizeDocuments(), approved(), saga, NOW))
    collect("workflow", decide(FinalizeDocuments(), approved(), saga, NOW))
    collect("workflow", decide(UnfinalizeDocuments("r"), finalized, saga, NOW))
    collect("workflow", decide(RecordCompletion(), finalized, saga, NOW))
    collect("workflow", decide(RecordCompletion(failed_step="sync", reason="r"), finalized,
                               saga, NOW))
    assert sorted(emitted) == contract.REGISTRY.names()
    for name, aggregate_type in emitted.items():
        assert contract.REGISTRY.get(name).aggregate_type == aggregate_type


def test_errors_have_snake_case_codes() -> None:
    errors = (NotFound, AlreadyExists, Forbidden, InvalidState, InvalidCommand)
    codes = {error.code for error in errors}
    assert len(codes) == len(errors)
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", code) for code in codes)
    assert all(issubclass(error, DomainError) for error in errors)


def test_initial_state_per_aggregate_type() -> None:
    aggregate_id = uuid4()
    assert initial_state(RegisterUser.aggregate_type, aggregate_id) == UserState(aggregate_id)
    assert initial_state(CreateDefinition.aggregate_type, aggregate_id) == DefinitionState(
        aggregate_id
    )
    assert initial_state(ApproveStep.aggregate_type, aggregate_id) == WorkflowState(aggregate_id)
    assert initial_state("workflow", aggregate_id).version == 0
    with pytest.raises(ValueError, match="unknown aggregate type"):
        initial_state("invoice", aggregate_id)


def test_programming_errors_are_not_domain_errors() -> None:
    with pytest.raises(TypeError, match="applies to a WorkflowState"):
        decide(SubmitWorkflow(), registered(), ALICE, NOW)
    with pytest.raises(TypeError, match="not a RingiFlow command"):
        decide(DocumentInfo(**document()), draft(), ALICE, NOW)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timezone-aware"):
        decide(SubmitWorkflow(), draft(), ALICE, datetime(2026, 4, 1))
    with pytest.raises(ValueError, match="does not apply"):
        evolve(registered(), DomainEvent("WorkflowSubmitted", {}))


def test_decide_does_not_mutate_the_command() -> None:
    command = create_command(documents=(DocumentInfo(**document()),))
    before = copy.deepcopy(command)
    decide(command, WorkflowState(uuid4()), ALICE, NOW)
    assert command == before


def test_decision_values_are_step_statuses() -> None:
    # evolve maps a decision onto the step status of the same name.
    assert {d.value for d in Decision} <= {s.value for s in StepStatus}

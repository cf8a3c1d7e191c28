"""The query API's OpenAPI document, beyond what FastAPI derives from the routes: the
schema of each response (the routes build their JSON themselves), the errors each route
can answer, the consistency-token parameters and headers, and links from lists to the
workflows they name (ListWorkflows -> GetWorkflow -> GetWorkflowHistory, next page),
which clients and stateful fuzzers (schemathesis) follow."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from infra import openapi
from infra.openapi import Operation, Spec

Q = "/api/v1/queries"
Status = Literal["draft", "in_progress", "approved", "rejected", "changes_requested",
                 "cancelled"]
Priority = Literal["low", "medium", "high", "urgent"]


class Model(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields may be added; none removed


class WorkflowSummary(Model):
    """A row of the workflow list read model."""

    id: UUID
    definition_id: UUID
    definition_name: str
    title: str
    status: Status
    priority: Priority
    current_step_id: UUID | None
    current_step_name: str | None
    current_assignee_id: UUID | None
    current_assignee_name: str | None
    initiated_by_id: UUID
    initiated_by_name: str
    due_date: datetime | None
    completed_at: datetime | None
    created_at: datetime
    updated_at: datetime
    last_event_version: int = Field(ge=1)


class WorkflowPage(Model):
    items: list[WorkflowSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page (same "
                                    "sort and direction); null on the last page.")


class Step(Model):
    step_id: UUID
    name: str
    order: int
    assignee_id: UUID
    assignee_name: str
    status: str
    assigned_at: datetime | None
    decision: str | None
    decided_at: datetime | None
    comment: str | None
    delegated_from: list[UUID]


class WorkflowComment(Model):
    comment_id: UUID
    author_id: UUID
    author_name: str
    body: str
    created_at: datetime


class WorkflowDocument(Model):
    document_id: UUID
    filename: str
    content_type: str
    size_bytes: int
    sha256: str | None
    url: str | None
    attached_by_id: UUID
    attached_by_name: str
    attached_at: datetime


class Workflow(Model):
    """The aggregate's state after its newest event (or after the last event at `as_of`)."""

    id: UUID
    version: int = Field(ge=1)
    status: Status
    definition_id: UUID
    definition_name: str
    title: str
    description: str | None
    priority: Priority
    due_date: datetime | None
    initiator_id: UUID
    initiator_name: str
    current_step_id: UUID | None
    current_step_name: str | None
    current_assignee_id: UUID | None
    current_assignee_name: str | None
    steps: list[Step]
    comments: list[WorkflowComment]
    documents: list[WorkflowDocument]
    created_at: datetime
    updated_at: datetime | None
    submitted_at: datetime | None
    completed_at: datetime | None
    cancelled_at: datetime | None
    cancel_reason: str | None


class WorkflowDetail(Model):
    workflow: Workflow
    source: Literal["cache", "event_store"]
    as_of: datetime | None = Field(default=None, description="With `?as_of=`: the instant.")


class HistoryEvent(Model):
    event_id: UUID
    version: int = Field(ge=1)
    event_type: str
    occurred_at: datetime
    recorded_at: datetime
    actor_id: UUID | None
    actor_name: str | None
    correlation_id: UUID | None
    causation_id: UUID | None
    trace_id: str | None
    details: dict[str, Any]


class WorkflowHistory(Model):
    workflow_id: UUID
    events: list[HistoryEvent] = Field(min_length=1)


class Task(Model):
    workflow_id: UUID
    step_id: UUID
    workflow_title: str
    step_name: str
    priority: Priority
    due_date: datetime | None
    assigned_at: datetime


class TaskList(Model):
    items: list[Task]


class DashboardStats(Model):
    pending: int = Field(ge=0)
    completed_today: int = Field(ge=0)
    overdue: int = Field(ge=0)
    as_of: datetime
    source: Literal["cache", "postgres"]


class SearchHit(Model):
    workflow_id: UUID
    title: str
    status: Status | None = None
    priority: Priority | None = None
    score: float | None
    highlight: dict[str, list[str]]


class SearchResults(Model):
    total: int = Field(ge=0)
    items: list[SearchHit]
    next_offset: int | None = Field(default=None, description="Pass as `offset` for the "
                                    "next page; null on the last page.")


class CompletionStep(Model):
    step: Literal["finalize", "notify", "sync", "withdraw", "correct", "unfinalize", "record"]
    status: Literal["done", "skipped", "failed"]
    attempts: int = Field(ge=1)
    at: datetime
    error: str | None = None
    reason: str | None = Field(default=None, description="Why a step was skipped.")


class Completion(Model):
    workflow_id: UUID
    status: Literal["running", "compensating", "completed", "completion_failed"]
    run: int = Field(ge=1, description="Runs so far (an operator's retry starts another).")
    current_step: str | None
    attempts: int = Field(ge=0, description="Attempts of the current step so far.")
    last_error: str | None
    steps: list[CompletionStep]
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class Delivery(Model):
    notification_id: UUID
    channel: Literal["email", "chat"]
    recipient_id: UUID
    workflow_id: UUID | None
    kind: str
    address: str | None = Field(description="The email address; a chat webhook's host only.")
    subject: str | None
    status: Literal["sent", "failed", "skipped"]
    attempts: int = Field(ge=0)
    last_error: str | None
    first_attempt_at: datetime
    sent_at: datetime | None


class DeliveryList(Model):
    items: list[Delivery]


# path -> (operationId, response model, errors besides 401, 413 and 503)
ROUTES: dict[str, tuple[str, type[BaseModel], set[int]]] = {
    f"{Q}/workflows": ("ListWorkflows", WorkflowPage, {422}),
    f"{Q}/workflows/{{workflow_id}}": ("GetWorkflow", WorkflowDetail, {404, 422}),
    f"{Q}/workflows/{{workflow_id}}/history": ("GetWorkflowHistory", WorkflowHistory,
                                               {404, 422}),
    f"{Q}/workflows/{{workflow_id}}/completion": ("GetWorkflowCompletion", Completion,
                                                  {404, 422}),
    f"{Q}/notifications": ("ListNotifications", DeliveryList, {422}),
    f"{Q}/my-tasks": ("ListMyTasks", TaskList, {422}),
    f"{Q}/dashboard/stats": ("GetDashboardStats", DashboardStats, set()),
    f"{Q}/search": ("SearchWorkflows", SearchResults, {422}),
}
DESCRIPTIONS = {
    "GetWorkflowCompletion": {404: "The workflow is not approved yet (or not in the caller's "
                                   "tenant), or the completion saga has not seen its approval."},
    "GetWorkflow": {404: "No such workflow in the caller's tenant (at `as_of`, when given)."},
    "SearchWorkflows": {503: "Search (OpenSearch) is unavailable; every other query still "
                             "works. Retry after `Retry-After` seconds."},
    "ListWorkflows": {422: "A parameter is invalid (e.g. `due_before` is not an ISO 8601 "
                           "date-time with a time zone), or the cursor or consistency token "
                           "is not one the API issued."},
}
WAIT_LIMIT = ("Too many reads of the caller (or its tenant) are already waiting for a "
              "consistency token; retry after `Retry-After` seconds.")
DATETIME_DESCRIPTION = ("An ISO 8601 date-time with a time zone, e.g. `2026-11-01T09:00:00Z` "
                        "or `2026-11-01T18:00:00+09:00`; anything else (a number, a date "
                        "alone, no zone) is refused with 422 naming the parameter.")
CONSISTENCY_HEADERS = {
    "X-Consistency": {"description": "With a consistency token: `reached` when the read model "
                      "has applied the token's write, `timeout` when `wait_ms` ran out first.",
                      "schema": {"type": "string", "enum": ["reached", "timeout"]}},
    "X-Consistency-Waited-Ms": {"description": "With a consistency token: how long the read "
                                "waited for it, in milliseconds.",
                                "schema": {"type": "string", "pattern": r"^\d+$"}},
}
TOKEN_DESCRIPTION = ("Read your own write: the consistency token a command returned. The "
                     "read waits (up to `wait_ms`) until its read model applied that write "
                     "and says so in `X-Consistency`; a malformed token is refused with 422 "
                     "`invalid_consistency_token`; an empty value is the same as none. "
                     + openapi.CONSISTENCY_TOKEN_FORMAT)
_WF, _DEF, _STEP = ("0f8e5d2a-7c1b-4e3f-9a6d-2b4c8e1f0a37", "5b1d7e20-3c4a-4f6b-8e9d-0a1b2c3d4e5f",
                    "9c2e4f60-1a3b-4c5d-8e7f-6a5b4c3d2e1f")
_APPROVER, _INITIATOR = ("2d4f6a80-5b7c-4d9e-8f1a-3b5c7d9e1f20",
                         "7e9a1c30-4d6f-4a8b-9c0d-1e2f3a4b5c6d")
EXAMPLES = {"ListWorkflows": {
    "items": [{"id": _WF, "definition_id": _DEF, "definition_name": "経費精算",
               "title": "ノートPC購入", "status": "in_progress", "priority": "high",
               "current_step_id": _STEP, "current_step_name": "課長承認",
               "current_assignee_id": _APPROVER, "current_assignee_name": "承認 一郎",
               "initiated_by_id": _INITIATOR, "initiated_by_name": "申請 太郎",
               "due_date": "2026-11-30T09:00:00+00:00", "completed_at": None,
               "created_at": "2026-11-23T12:00:00+00:00",
               "updated_at": "2026-11-23T12:05:00+00:00", "last_event_version": 2}],
    "next_cursor": "WyJjcmVhdGVkIiwiZGVzYyIsIjIwMjYtMTEtMjNUMTI6MDA6MDBaIiwi"}}
FIRST_ITEM = "$response.body#/items/0/workflow_id"
LINKS: list[tuple[str, str, str, Spec]] = [
    ("ListWorkflows", "GetWorkflow", "GetWorkflow",
     {"parameters": {"workflow_id": "$response.body#/items/0/id"}}),
    ("ListWorkflows", "GetWorkflowHistory", "GetWorkflowHistory",
     {"parameters": {"workflow_id": "$response.body#/items/0/id"}}),
    ("ListWorkflows", "NextPage", "ListWorkflows",
     {"parameters": {"cursor": "$response.body#/next_cursor"},
      "description": "The next page (send the same sort and direction, or the cursor is "
                     "refused)."}),
    ("GetWorkflow", "GetWorkflowHistory", "GetWorkflowHistory",
     {"parameters": {"workflow_id": "$response.body#/workflow/id"}}),
    ("GetWorkflowHistory", "GetWorkflow", "GetWorkflow",
     {"parameters": {"workflow_id": "$response.body#/workflow_id"}}),
    ("ListMyTasks", "GetWorkflow", "GetWorkflow", {"parameters": {"workflow_id": FIRST_ITEM}}),
    ("SearchWorkflows", "GetWorkflow", "GetWorkflow",
     {"parameters": {"workflow_id": FIRST_ITEM}}),
]


def customize(spec: Spec) -> None:
    _, definitions = models_json_schema(
        [(model, "serialization") for _, model, _ in ROUTES.values()],
        ref_template="#/components/schemas/{model}")
    spec["components"]["schemas"].update(definitions.get("$defs", {}))
    by_id: dict[str, Operation] = {}
    for path, method, operation in openapi.operations(spec):
        if method != "get" or path not in ROUTES:
            continue
        name, model, errors = ROUTES[path]
        operation["operationId"] = name
        by_id[name] = operation
        ok = operation["responses"]["200"]
        content = ok.setdefault("content", {}).setdefault("application/json", {})
        content["schema"] = {"$ref": f"#/components/schemas/{model.__name__}"}
        if name in EXAMPLES:
            content["example"] = EXAMPLES[name]
        openapi.document_errors(operation, {401, 413, 503} | errors, DESCRIPTIONS.get(name))
        for parameter in operation.get("parameters", []):
            if parameter["name"] in ("due_before", "due_after", "as_of"):
                what = {"due_before": "Only workflows due before this instant. ",
                        "due_after": "Only workflows due after this instant. "}.get(
                            parameter["name"], parameter.get("description", "") + " ")
                parameter["description"] = what + DATETIME_DESCRIPTION
            if parameter["name"] in ("X-Consistency-Token", "after"):
                parameter["description"] = TOKEN_DESCRIPTION if parameter["in"] == "header" \
                    else "The consistency token as a query parameter (for links); the " \
                    "header's wins when both are sent, and both must be well formed."
                parameter["schema"] = openapi.CONSISTENCY_TOKEN_PARAMETER
                ok["headers"] = CONSISTENCY_HEADERS
                openapi.document_errors(operation, {429}, {429: WAIT_LIMIT})
    for source, name, target, link in LINKS:
        if source in by_id and target in by_id:
            response = by_id[source]["responses"]["200"]
            response.setdefault("links", {})[name] = {"operationId": target, **link}


def install(app: FastAPI) -> None:
    openapi.install(app, customize)

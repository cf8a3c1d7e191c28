"""The command API: POST /api/v1/commands/... (every route is in its OpenAPI document,
/docs).

The edge only: each route validates its body, builds the command context (caller,
correlation, idempotency key) and calls the command's handler (`commands.handlers`);
every refusal from below is mapped to problem+json here, in STATUSES.

No `from __future__ import annotations` here: FastAPI must see the body types
of the routes generated in loops as real objects, not strings."""

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any
from uuid import UUID, uuid4

import orjson
from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from psycopg_pool import AsyncConnectionPool

from commands import domain, handlers, openapi, schemas
from commands.bell import OutboxBell
from commands.cache import StateCache
from commands.group_commit import GroupCommit
from commands.service import (
    CommandContext,
    IdempotencyKeyReused,
    NotAllowed,
    Outcome,
    ReadsChanged,
    VersionConflict,
    Writer,
)
from contract import new_trace_id, parse_traceparent
from infra import problems, tracing
from infra.auth import Authenticator, Principal, authenticator
from infra.clients import readiness_checks
from infra.edge import RequestGuard
from infra.problems import Problem
from infra.security import principal_dependency
from infra.service import health_router
from infra.settings import Settings, libpq_url

IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def command_context(request: Request, principal: Principal, body: schemas.CommandBody,
                    idempotency_key: str | None) -> CommandContext:
    correlation = request.headers.get("x-correlation-id")
    try:
        correlation_id = UUID(correlation) if correlation else uuid4()
    except ValueError:
        raise Problem(422, "invalid_header", "Invalid X-Correlation-ID",
                      f"X-Correlation-ID {correlation!r} is not a UUID") from None
    trace_id = new_trace_id()
    if (span := tracing.current_span_context()) is not None:
        trace_id = f"{span.trace_id:032x}"  # the request span continued any traceparent
    elif traceparent := request.headers.get("traceparent"):
        try:
            trace_id, _ = parse_traceparent(traceparent)
        except ValueError:
            pass  # W3C: an invalid traceparent starts a new trace
    if idempotency_key is not None and not IDEMPOTENCY_KEY.match(idempotency_key):
        raise Problem(422, "invalid_header", "Invalid Idempotency-Key",
                      "Idempotency-Key must be 1-255 visible ASCII characters")
    # The caller is part of the fingerprint: another user's key never replays to you.
    # Only a keyed request is ever compared, so an unkeyed one skips the serialising.
    fingerprint = "" if idempotency_key is None else (
        f"{principal.user_id} POST {request.scope['path']} "
        + body.model_dump_json(exclude={"expected_version"}))
    return CommandContext(principal, uuid4(), correlation_id, trace_id, idempotency_key,
                          body.expected_version, fingerprint)


def respond(outcome: Outcome) -> Response:
    """The answer, serialised once: the body already has the documented shape
    (`schemas.CommandAccepted`, still the routes' response_model for the docs), so
    FastAPI's validate-and-encode pass would only redo it on every command."""
    headers = {"X-Correlation-ID": outcome.body["correlation_id"]}
    if outcome.replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(orjson.dumps(outcome.body), outcome.status_code, headers,
                    media_type="application/json")


# Every refusal below the edge, as the status it answers (most specific class first).
STATUSES: problems.Statuses = {
    domain.UnknownReference: (422, "Unknown reference"),
    domain.NotFound: (404, "Not found"),
    domain.Forbidden: (403, "Not allowed"),
    domain.AlreadyExists: (409, "Conflict"),
    domain.InvalidState: (409, "Conflict"),
    domain.InvalidCommand: (422, "Command refused"),
    VersionConflict: (409, "Version conflict"),
    ReadsChanged: (409, "Conflict"),
    IdempotencyKeyReused: (422, "Idempotency-Key reused"),
    NotAllowed: (403, "Not allowed"),
}


def build_router(writer_of: Callable[[], Writer], auth: Authenticator) -> APIRouter:
    """Parse, call the command's handler (`commands.handlers`), answer."""
    router = APIRouter(prefix="/api/v1/commands", tags=["commands"],
                       responses={401: {"description": "Missing or invalid credentials"},
                                  409: {"description": "Version conflict or invalid state"},
                                  422: {"description": "Invalid request (problem+json)"}})
    Auth = Annotated[Principal, Depends(principal_dependency(auth))]
    IdemKey = Annotated[str | None, Header(alias="Idempotency-Key")]

    def ctx(request: Request, principal: Principal, body: schemas.CommandBody,
            key: str | None) -> CommandContext:
        return command_context(request, principal, body, key)

    # --- users ------------------------------------------------------------------

    @router.post("/users", status_code=201, response_model=schemas.CommandAccepted,
                 summary="RegisterUser")
    async def register_user(body: schemas.RegisterUserBody, request: Request,
                            principal: Auth, key: IdemKey = None) -> Response:
        return respond(await handlers.register_user(
            writer_of(), ctx(request, principal, body, key), body.user_id, body.display_name,
            body.email))

    @router.post("/users/{user_id}/rename", response_model=schemas.CommandAccepted,
                 summary="RenameUser")
    async def rename_user(user_id: UUID, body: schemas.RenameUserBody, request: Request,
                          principal: Auth, key: IdemKey = None) -> Response:
        return respond(await handlers.rename_user(
            writer_of(), ctx(request, principal, body, key), user_id, body.display_name))

    @router.post("/users/{user_id}/notification-preferences",
                 response_model=schemas.CommandAccepted, summary="SetNotificationPreferences")
    async def set_notification_preferences(
            user_id: UUID, body: schemas.NotificationPreferencesBody, request: Request,
            principal: Auth, key: IdemKey = None) -> Response:
        return respond(await handlers.set_notification_preferences(
            writer_of(), ctx(request, principal, body, key), user_id, body.locale,
            tuple(body.channels), body.chat_webhook_url))

    # --- definitions --------------------------------------------------------------

    @router.post("/definitions", status_code=201, response_model=schemas.CommandAccepted,
                 summary="CreateDefinition")
    async def create_definition(body: schemas.CreateDefinitionBody, request: Request,
                                principal: Auth,
                                key: IdemKey = None) -> Response:
        return respond(await handlers.create_definition(
            writer_of(), ctx(request, principal, body, key), body.name,
            [(s.name, s.assignee_id) for s in body.steps], body.description))

    # --- workflows ----------------------------------------------------------------

    @router.post("/workflows", status_code=201, response_model=schemas.CommandAccepted,
                 summary="CreateWorkflow")
    async def create_workflow(body: schemas.CreateWorkflowBody, request: Request,
                              principal: Auth,
                              key: IdemKey = None) -> Response:
        return respond(await handlers.create_workflow(
            writer_of(), ctx(request, principal, body, key), body.definition_id, body.title,
            body.description, body.priority, body.due_date,
            tuple(document_info(d) for d in body.documents)))

    def workflow_route(path: str, summary: str, body_type: type[schemas.CommandBody],
                       make: Callable[[Any], domain.Command]) -> None:
        async def handler(workflow_id: UUID, body: body_type, request: Request,  # type: ignore[valid-type]
                          principal: Auth, key: IdemKey = None) -> Response:
            return respond(await handlers.on_workflow(
                writer_of(), ctx(request, principal, body, key), workflow_id, make(body)))

        router.add_api_route(f"/workflows/{{workflow_id}}{path}", handler, methods=["POST"],
                             response_model=schemas.CommandAccepted, summary=summary,
                             name=summary)

    workflow_route("/submit", "SubmitWorkflow", schemas.SubmitBody,
                   lambda b: domain.SubmitWorkflow())
    workflow_route("/resubmit", "ResubmitWorkflow", schemas.ResubmitBody,
                   lambda b: domain.ResubmitWorkflow(b.comment))
    workflow_route("/cancel", "CancelWorkflow", schemas.CancelBody,
                   lambda b: domain.CancelWorkflow(b.reason))
    workflow_route("/comments", "AddComment", schemas.CommentBody,
                   lambda b: domain.AddComment(b.body))
    workflow_route("/documents", "AttachDocument", schemas.AttachDocumentBody,
                   lambda b: domain.AttachDocument(**document_info(b).__dict__))

    def step_route(path: str, summary: str, body_type: type[schemas.CommandBody],
                   make: Callable[[UUID, Any], domain.Command]) -> None:
        async def handler(workflow_id: UUID, step_id: UUID, body: body_type,  # type: ignore[valid-type]
                          request: Request, principal: Auth,
                          key: IdemKey = None) -> Response:
            return respond(await handlers.on_workflow(
                writer_of(), ctx(request, principal, body, key), workflow_id,
                make(step_id, body)))

        router.add_api_route(f"/workflows/{{workflow_id}}/steps/{{step_id}}{path}", handler,
                             methods=["POST"], response_model=schemas.CommandAccepted,
                             summary=summary, name=summary)

    step_route("/approve", "ApproveStep", schemas.ApproveBody,
               lambda s, b: domain.ApproveStep(s, b.comment))
    step_route("/reject", "RejectStep", schemas.DecisionWithReasonBody,
               lambda s, b: domain.RejectStep(s, b.comment))
    step_route("/request-changes", "RequestChanges", schemas.DecisionWithReasonBody,
               lambda s, b: domain.RequestChanges(s, b.comment))

    @router.post("/workflows/{workflow_id}/steps/{step_id}/delegate",
                 response_model=schemas.CommandAccepted, summary="DelegateStep")
    async def delegate_step(workflow_id: UUID, step_id: UUID, body: schemas.DelegateBody,
                            request: Request, principal: Auth,
                            key: IdemKey = None) -> Response:
        return respond(await handlers.delegate_step(
            writer_of(), ctx(request, principal, body, key), workflow_id, step_id,
            body.delegate_to, body.comment))

    return router


def document_info(body: schemas.DocumentBody) -> domain.DocumentInfo:
    return domain.DocumentInfo(
        document_id=body.document_id or uuid4(), filename=body.filename,
        content_type=body.content_type, size_bytes=body.size_bytes, sha256=body.sha256,
        url=body.url)


def create_app(settings: Settings) -> FastAPI:
    holder: dict[str, Writer] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        url = libpq_url(settings.role_database_url("command"))
        bell = OutboxBell(url)
        pool = AsyncConnectionPool(
            url, min_size=min(2, settings.command_db_pool_size),
            max_size=settings.command_db_pool_size, open=False, timeout=10,
            max_waiting=settings.command_db_max_waiting,
            kwargs={"autocommit": True, "prepare_threshold": 1}, configure=bell.configure,
        )
        await pool.open(wait=False)
        group = (GroupCommit(settings.command_group_commit)
                 if settings.command_group_commit > 1 else None)
        holder["writer"] = Writer(pool, StateCache(settings.command_state_cache), bell,
                                  StateCache(settings.command_state_cache), group)
        try:
            yield
        finally:
            await pool.close()
            await bell.close()

    app = FastAPI(
        title="RingiFlow command API", version="1", lifespan=lifespan,
        description="Commands append events to the event store and outbox in one transaction. "
        "Errors are RFC 9457 problem+json.",
    )
    problems.install(app, STATUSES)
    openapi.install(app)  # problem+json errors, headers, links, docs served locally
    auth = authenticator(settings)
    app.add_middleware(RequestGuard, auth=auth, max_body_bytes=settings.max_body_bytes,
                       max_json_depth=settings.max_json_depth)
    app.include_router(health_router("command-api", readiness_checks(settings, "command")))
    app.include_router(build_router(lambda: holder["writer"], auth))
    return app

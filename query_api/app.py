"""The query API: GET /api/v1/queries/... over the read models, and a
WebSocket of live updates. Every read is tenant-scoped by the credential.

No `from __future__ import annotations`: FastAPI reads these signatures."""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal
from uuid import UUID

import orjson
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Response, WebSocket
from opensearchpy.exceptions import NotFoundError, OpenSearchException
from redis.exceptions import RedisError
from starlette.websockets import WebSocketDisconnect

from contract import schemas, utcnow
from infra import problems
from infra.auth import AuthError, Principal, authenticator
from infra.clients import opensearch_client, readiness_checks, redis_client
from infra.edge import RequestGuard
from infra.problems import Problem
from infra.security import principal_dependency
from infra.service import health_router
from infra.settings import Settings, libpq_url
from projectors.cache.layout import dashboard, user_ids, with_current_names
from query_api import openapi
from query_api.cache import DetailCache
from query_api.consistency import (
    DEFAULT_WAIT_MS,
    Consistency,
    InvalidConsistencyToken,
    TooManyWaits,
    Waits,
    listen_applied,
    parse_token,
)
from query_api.live import LiveHub, Refused, Shares, tenant_channel, user_channel
from query_api.params import IsoDateTime
from query_api.reads import InvalidCursor, Reads

log = logging.getLogger("ringiflow.query")

Status = Literal["draft", "in_progress", "approved", "rejected", "changes_requested",
                 "cancelled"]
Priority = Literal["low", "medium", "high", "urgent"]
MAX_PAGE = 100
WS_QUEUE = 256  # messages a socket may have unsent before it counts as too slow


def json_response(body: Any, consistency: Consistency | None = None,
                  headers: dict[str, str] | None = None) -> Response:
    merged = {**(consistency.headers() if consistency else {}), **(headers or {})}
    return Response(orjson.dumps(body), media_type="application/json", headers=merged)


# Every refusal below the edge, as the status it answers.
STATUSES: problems.Statuses = {
    InvalidCursor: (422, "Invalid cursor"),
    InvalidConsistencyToken: (422, "Invalid consistency token"),
    TooManyWaits: (429, "Too many consistency waits"),
}


def create_app(settings: Settings) -> FastAPI:
    state: dict[str, Any] = {}
    # opensearch-py warns on every non-2xx answer, and a consistency wait on a
    # document not indexed yet is a stream of expected 404s: ~90 lines a request.
    # Failures that matter reach the caller (503) and our own log line.
    logging.getLogger("opensearch").setLevel(logging.ERROR)
    waits = Waits(settings.consistency_waits_per_user, settings.consistency_waits_per_tenant)
    sockets = Shares("live connections", settings.ws_max_per_user, settings.ws_max_per_tenant,
                     settings.ws_max_total)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        pool = Reads.pool_for(libpq_url(settings.role_database_url("query")))
        await pool.open(wait=False)
        redis = redis_client(settings.require("redis_url"))
        search = opensearch_client(settings.require("opensearch_url"))
        hub = LiveHub(redis)
        await hub.start()

        def wake(tenant: str) -> Callable[[bytes], None]:
            def woken(message: bytes) -> None:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    update = orjson.loads(message)
                    if update.get("type") == "WorkflowUpdated":
                        payload = update["payload"]
                        waits.applied("redis", tenant, UUID(payload["workflow_id"]),
                                      int(payload["version"]))
            return woken

        wakers: dict[str, Callable[[bytes], None]] = {}

        async def watch(tenant: str) -> bool:  # the cache-projector's updates wake waiters
            wakers[tenant] = wake(tenant)
            try:
                await hub.subscribe([tenant_channel(tenant)], wakers[tenant])
            except RedisError:
                return False
            return True

        async def unwatch(tenant: str) -> None:
            if (waker := wakers.pop(tenant, None)) is not None:
                await hub.unsubscribe([tenant_channel(tenant)], waker)

        waits.on_first, waits.on_last = watch, unwatch
        reads_ = Reads(pool)
        waits.trace_of = reads_.trace_of
        listener = asyncio.create_task(
            listen_applied(libpq_url(settings.role_database_url("query")), waits))
        state.update(reads=reads_, cache=DetailCache(redis), redis=redis, search=search,
                     hub=hub)
        try:
            yield
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            await hub.close()
            await pool.close()
            await redis.aclose()
            await search.close()

    app = FastAPI(
        title="RingiFlow query API", version="1", lifespan=lifespan,
        description="Read models over HTTP and WebSocket. Send a command's consistency token "
        "(X-Consistency-Token or ?after=) to read your own write; the response says whether "
        "the read model reached it (X-Consistency: reached | timeout). Errors are RFC 9457.")
    problems.install(app, STATUSES)
    openapi.install(app)  # response schemas, errors, links, docs served locally
    checks = readiness_checks(settings, "query", "redis", "opensearch")
    app.include_router(health_router("query-api", checks, optional=frozenset({"redis",
                                                                             "opensearch"})))
    app.include_router(contract_router())
    auth = authenticator(settings)
    app.add_middleware(RequestGuard, auth=auth, max_body_bytes=settings.max_body_bytes,
                       max_json_depth=settings.max_json_depth)
    Auth = Annotated[Principal, Depends(principal_dependency(auth))]
    TokenHeader = Annotated[str | None, Header(alias="X-Consistency-Token",
                                               description="From a command response.")]
    After = Annotated[str | None, Query(description="Consistency token (alternative to the "
                                        "X-Consistency-Token header).")]
    WaitMs = Annotated[int, Query(ge=0, le=10_000, description="How long to wait for the "
                                  "token, in milliseconds.")]
    router = APIRouter(prefix="/api/v1/queries", tags=["queries"],
                       responses={401: {"description": "Missing or invalid credentials"},
                                  422: {"description": "Invalid parameters (problem+json)"}})

    def reads() -> Reads:
        return state["reads"]

    @router.get("/workflows", summary="List workflows (filters, sort, keyset pagination)",
                responses={200: {"content": {"application/json": {"example": {
                    "items": [{"id": "0f8e…", "title": "ノートPC購入", "status": "in_progress",
                               "priority": "high", "current_assignee_name": "承認 一郎"}],
                    "next_cursor": "WyJjcmVhdGVkIiwiZGVzYyIsIjIwMjYtMTEtMjNUMTI6MDA6MDBaIiwi"}}}}})
    async def list_workflows(
        principal: Auth,
        status: Annotated[list[Status] | None, Query()] = None,
        priority: Annotated[list[Priority] | None, Query()] = None,
        initiator: UUID | None = None, assignee: UUID | None = None,
        due_before: IsoDateTime | None = None, due_after: IsoDateTime | None = None,
        sort: Literal["created", "updated", "due", "priority"] = "created",
        direction: Literal["asc", "desc"] = "desc",
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
        cursor: Annotated[str | None, Query(max_length=512, description="next_cursor of the "
                                            "previous page, unchanged")] = None,
        token: TokenHeader = None, after: After = None, wait_ms: WaitMs = DEFAULT_WAIT_MS,
    ) -> Response:
        consistency = await waits.wait(
            principal.tenant_id, principal.user_id, parse_token(token, after),
            lambda t: reads().applied_workflow_version(principal.tenant_id, t), wait_ms,
            "workflow_list")
        page = await reads().workflows(
            principal.tenant_id, sort=sort, direction=direction, limit=limit, cursor=cursor,
            filters={"status": status, "priority": priority, "initiator": initiator,
                     "assignee": assignee, "due_before": due_before, "due_after": due_after})
        return json_response(page, consistency)

    @router.get("/workflows/{workflow_id}", summary="A workflow (cache first; as_of: time "
                "travel from the event store)",
                responses={404: {"description": "No such workflow in your tenant (then)"}})
    async def get_workflow(
        workflow_id: UUID, principal: Auth,
        as_of: Annotated[IsoDateTime | None, Query(description="Its state at this instant.")]
        = None,
        token: TokenHeader = None, after: After = None, wait_ms: WaitMs = DEFAULT_WAIT_MS,
    ) -> Response:
        tenant = principal.tenant_id
        requested = parse_token(token, after)  # a malformed token is refused, as_of or not
        if as_of is not None:
            if as_of.tzinfo is None:
                raise Problem(422, "validation_error", "as_of needs a time zone",
                              "send as_of with a time zone, e.g. 2026-11-01T09:00:00Z")
            snapshot = await reads().snapshot(tenant, workflow_id, as_of)
            if snapshot is None:
                raise not_found(workflow_id, f"at {as_of.isoformat()}")
            return json_response({"workflow": snapshot, "as_of": as_of.isoformat(),
                                  "source": "event_store"})
        cache: DetailCache = state["cache"]
        consistency = await waits.wait(
            tenant, principal.user_id, requested,
            lambda t: cache.applied_version(tenant, t.aggregate_id), wait_ms, "workflow_detail")
        snapshot, source = await cache.get(tenant, workflow_id), "cache"
        wanted = consistency.token.version if consistency.token else 0
        if snapshot is None or snapshot["version"] < wanted:
            # The event store always has the write: a miss, or a cache that has not
            # caught up with the token, is answered from it.
            snapshot, source = await cache.load(
                tenant, workflow_id, lambda: event_store_detail(tenant, workflow_id)), \
                "event_store"
            if snapshot is not None and consistency.status == "timeout" and \
                    snapshot["version"] >= wanted:
                consistency = Consistency("reached", consistency.waited_ms, consistency.token)
        if snapshot is None:
            raise not_found(workflow_id)
        return json_response({"workflow": snapshot, "source": source}, consistency)

    async def event_store_detail(tenant: UUID, workflow_id: UUID) -> dict[str, Any] | None:
        snapshot = await reads().snapshot(tenant, workflow_id)
        if snapshot is None:
            return None
        names = await reads().current_names(tenant, user_ids(snapshot))
        return with_current_names(snapshot, names.get)

    @router.get("/workflows/{workflow_id}/history", summary="Who did what, when (event store)")
    async def history(workflow_id: UUID, principal: Auth) -> Response:
        events = await reads().history(principal.tenant_id, workflow_id)
        if not events:
            raise not_found(workflow_id)
        return json_response({"workflow_id": workflow_id, "events": events})

    @router.get("/workflows/{workflow_id}/completion",
                summary="The completion saga of an approved workflow (steps, status, attempts, "
                "last error)")
    async def completion(workflow_id: UUID, principal: Auth) -> Response:
        found = await reads().completion(principal.tenant_id, workflow_id)
        if found is None:
            raise Problem(404, "not_found", "Not found",
                          f"workflow {workflow_id} has no completion in your tenant: it is not "
                          "approved yet, or the completion saga has not seen its approval")
        return json_response(found)

    @router.get("/notifications", summary="Notification deliveries (status per channel)")
    async def notifications(
        principal: Auth, workflow_id: Annotated[UUID | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    ) -> Response:
        items = await reads().notifications(principal.tenant_id, workflow_id, limit)
        return json_response({"items": items})

    @router.get("/my-tasks", summary="Steps waiting for the caller's decision")
    async def my_tasks(
        principal: Auth, limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
        token: TokenHeader = None, after: After = None, wait_ms: WaitMs = DEFAULT_WAIT_MS,
    ) -> Response:
        consistency = await waits.wait(
            principal.tenant_id, principal.user_id, parse_token(token, after),
            lambda t: reads().applied_workflow_version(principal.tenant_id, t), wait_ms,
            "my_tasks")
        tasks = await reads().my_tasks(principal.tenant_id, principal.user_id, limit)
        return json_response({"items": tasks}, consistency)

    @router.get("/dashboard/stats", summary="Pending, completed today, overdue (Redis; "
                "PostgreSQL when Redis is down)")
    async def stats(principal: Auth) -> Response:
        now = utcnow()
        try:
            figures, source = await dashboard(state["redis"], principal.tenant_id, now), "cache"
        except RedisError as exc:
            log.warning("dashboard from PostgreSQL: Redis unavailable (%s)", exc)
            figures, source = await reads().stats(principal.tenant_id, now), "postgres"
        return json_response({**figures, "as_of": now.isoformat(), "source": source})

    @router.get("/search", summary="Full-text search (Japanese and English)",
                responses={503: {"description": "Search is unavailable; retry later"}})
    async def search(
        principal: Auth, q: Annotated[str, Query(min_length=1, max_length=200)],
        status: Annotated[list[Status] | None, Query()] = None,
        priority: Annotated[list[Priority] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
        offset: Annotated[int, Query(ge=0, le=1000)] = 0,
        token: TokenHeader = None, after: After = None, wait_ms: WaitMs = DEFAULT_WAIT_MS,
    ) -> Response:
        client = state["search"]
        filters: list[dict[str, Any]] = [{"term": {"tenant_id": str(principal.tenant_id)}}]
        if status:
            filters.append({"terms": {"status": status}})
        if priority:
            filters.append({"terms": {"priority": priority}})

        async def indexed_version(t: Any) -> int:
            try:
                # realtime=false: the version a search finds (refreshed), not the
                # translog's; the indexer refreshes every batch it applies.
                doc = await client.get(index=settings.search_alias, id=str(t.aggregate_id),
                                       params={"realtime": "false"})
            except NotFoundError:
                return 0
            except OpenSearchException:
                return 0
            same_tenant = doc["_source"]["tenant_id"] == str(principal.tenant_id)
            return int(doc["_version"]) if same_tenant else 0

        try:
            # Woken by the search-indexer's NOTIFY once a refresh made its bulk searchable.
            consistency = await waits.wait(principal.tenant_id, principal.user_id,
                                           parse_token(token, after), indexed_version, wait_ms,
                                           "search")
            found = await client.search(index=settings.search_alias, body={
                "query": {"bool": {"filter": filters, "must": [{"multi_match": {
                    "query": q, "fields": ["title^3", "title.en^2", "description",
                                           "description.en", "comments", "comments.en"]}}]}},
                "highlight": {"fields": {"title": {}, "description": {}, "comments": {}}},
                "from": offset, "size": limit, "_source": {"excludes": ["comments"]}})
        except NotFoundError:
            return json_response({"total": 0, "items": []})
        except OpenSearchException as exc:
            raise Problem(503, "search_unavailable", "Search is unavailable",
                          f"the search index cannot be reached ({type(exc).__name__}); every "
                          "other query still works; retry later",
                          headers={"Retry-After": "5"}) from None
        hits = found["hits"]
        items = [{**h["_source"], "score": h["_score"], "highlight": h.get("highlight", {})}
                 for h in hits["hits"]]
        return json_response({"total": hits["total"]["value"], "items": items,
                              "next_offset": offset + limit
                              if offset + limit < hits["total"]["value"] else None},
                             consistency)

    @router.websocket("/ws")
    async def live(websocket: WebSocket, token: str | None = None) -> None:
        """Live updates for the caller: their user's and tenant's channels, with
        heartbeats; closed when the token expires. Authenticate with the
        Authorization header or ?token=."""
        await websocket.accept()
        try:
            header = websocket.headers.get("authorization")
            principal = auth.authenticate(header or (f"Bearer {token}" if token else None),
                                          websocket.headers.get("x-api-key"))
        except AuthError as exc:
            await websocket.close(code=4401, reason=str(exc)[:120])
            return
        try:
            with sockets.hold(principal.tenant_id, principal.user_id):
                await stream_updates(websocket, principal)
        except Refused as exc:
            await websocket.close(code=1013, reason=str(exc)[:120])

    async def stream_updates(websocket: WebSocket, principal: Principal) -> None:
        hub: LiveHub = state["hub"]
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=WS_QUEUE)
        behind = asyncio.Event()

        def deliver(data: bytes) -> None:
            try:
                queue.put_nowait(data)
            except asyncio.QueueFull:
                behind.set()  # this client cannot keep up; the others are not held back

        channels = [user_channel(principal.tenant_id, principal.user_id),
                    tenant_channel(principal.tenant_id)]
        try:
            await hub.subscribe(channels, deliver)
        except RedisError:
            await websocket.close(code=1013, reason="live updates unavailable; retry later")
            return
        loop = asyncio.get_running_loop()

        async def forward() -> None:
            await websocket.send_json({"type": "Subscribed", "payload": {"channels": channels}})
            last_beat = loop.time()
            while True:
                now = time.time()
                if principal.expires_at is not None and now >= principal.expires_at:
                    await websocket.close(code=4401, reason="token expired: reconnect with "
                                          "a fresh token")
                    return
                if behind.is_set():
                    await websocket.close(code=1013, reason="client too slow: reconnect and "
                                          "re-read what you show")
                    return
                timeout = settings.ws_heartbeat_s - (loop.time() - last_beat)
                if principal.expires_at is not None:
                    timeout = min(timeout, principal.expires_at - now)
                try:
                    data = await asyncio.wait_for(queue.get(), max(timeout, 0))
                    await websocket.send_text(data.decode())
                except TimeoutError:
                    pass
                if loop.time() - last_beat >= settings.ws_heartbeat_s:
                    await websocket.send_json({"type": "Heartbeat",
                                               "payload": {"at": utcnow().isoformat()}})
                    last_beat = loop.time()

        async def drain_client() -> None:
            while True:
                await websocket.receive_text()  # clients may ping; nothing else is expected

        tasks = [asyncio.create_task(forward()), asyncio.create_task(drain_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except WebSocketDisconnect:
            pass
        finally:
            for task in tasks:
                task.cancel()
            await hub.unsubscribe(channels, deliver)

    app.include_router(router)
    return app


def not_found(workflow_id: UUID, when: str = "") -> Problem:
    suffix = f" {when}" if when else ""
    return Problem(404, "not_found", "Not found",
                   f"workflow {workflow_id} does not exist in your tenant{suffix}")


def contract_router() -> APIRouter:
    """The event contract, published (no credentials: like /openapi.json, it describes
    the interface, not tenant data): the AsyncAPI document of every topic and the JSON
    Schema of each event type, generated from contract's models."""
    router = APIRouter(tags=["contract"])

    @router.get("/asyncapi.json", summary="AsyncAPI 3 document of every topic")
    async def asyncapi_document() -> Response:
        return Response(orjson.dumps(schemas.asyncapi()), media_type="application/json")

    @router.get("/schemas/events/{event_type}.json", summary="JSON Schema of one event type",
                responses={404: {"description": "No such event type"},
                           422: {"description": "Invalid request (problem+json)"}})
    async def event_schema(event_type: str) -> Response:
        found = schemas.event_schemas().get(event_type)
        if found is None:
            raise Problem(404, "not_found", "Unknown event type",
                          f"no event type {event_type!r}; known: "
                          f"{', '.join(sorted(schemas.event_schemas()))}")
        return Response(orjson.dumps(found), media_type="application/schema+json")

    return router


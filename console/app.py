"""The console's HTTP edge: the page (vendored, no CDN), sign-in, JSON for each view,
live updates over server-sent events, and the operator's actions (retry, discard,
verify, rebuild), each written to the audit trail by `operations`."""

from __future__ import annotations

import asyncio
import html
import threading
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs
from uuid import UUID

import orjson
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.responses import StreamingResponse as Streaming
from pydantic import BaseModel, Field

from console import views
from console.session import COOKIE, Session, session_of, sign_in
from contract import CONSUMER_GROUPS, DEFINITION_EVENTS, USER_EVENTS, WORKFLOW_EVENTS
from infra.auth import AuthError, authenticator
from infra.clients import readiness_checks
from infra.service import health_router
from infra.settings import Settings
from operations import dlq

STATIC = Path(__file__).parent / "static"
LIVE_EVERY_S = 2.0


def json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data, default=str), status_code=status,
                    media_type="application/json")


class RetryBody(BaseModel):
    group: str
    aggregate_id: UUID
    tenant_id: UUID
    dry_run: bool = True


class DiscardBody(BaseModel):
    group: str
    aggregate_id: UUID
    tenant_id: UUID
    reason: str = Field(min_length=3, max_length=2000)


class ProjectorBody(BaseModel):
    projector: str
    repair: bool = False  # verify: replay exactly the aggregates that differ
    abandon: bool = False  # rebuild: discard the unfinished one instead of resuming it


def create_app(settings: Settings) -> FastAPI:
    auth = authenticator(settings)
    secret = settings.dev_jwt_secret or "console"
    jobs: dict[str, dict[str, Any]] = {}  # rebuilds started here: projector -> progress
    app = FastAPI(title="RingiFlow console", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(health_router("console", readiness_checks(settings, "query")))

    def session(request: Request, action: bool = False) -> Session:
        return session_of(request, auth, secret, action)

    async def blocking(function: Any, *args: Any) -> Any:
        return await asyncio.to_thread(function, *args)

    @app.exception_handler(HTTPException)
    async def problem(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 401 and request.url.path in ("/", "/index.html"):
            return RedirectResponse("/login", status_code=303)
        return json({"status": exc.status_code, "detail": exc.detail}, exc.status_code)

    @app.get("/login", response_class=HTMLResponse)
    async def login_page(error: str | None = None) -> HTMLResponse:
        page = (STATIC / "login.html").read_text(encoding="utf-8")
        message = f'<p class="error">{html.escape(error)}</p>' if error else ""
        return HTMLResponse(page.replace("<!--error-->", message))

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body())[:16384].decode(errors="replace"))
        token = (form.get("token") or [""])[0]
        try:
            sign_in(auth, token.strip())
        except AuthError as exc:
            return RedirectResponse(f"/login?error={html.escape(str(exc))}", status_code=303)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token.strip(), httponly=True, samesite="strict",
                            secure=False, path="/")
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        session(request, action=True)
        response = json({"signed_out": True})
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/", response_class=HTMLResponse)
    async def index(request: Request) -> HTMLResponse:
        s = session(request)
        page = (STATIC / "index.html").read_text(encoding="utf-8")
        who = html.escape(f"{s.principal.name} ({', '.join(s.principal.roles)}"
                          + ("" if s.everything else f", tenant {s.principal.tenant_id}") + ")")
        return HTMLResponse(page.replace("{{csrf}}", s.csrf).replace("{{who}}", who)
                            .replace("{{tenant}}", str(s.principal.tenant_id))
                            .replace("{{operator}}", "true" if s.everything else "false"))

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        path = STATIC / name
        if "/" in name or not path.is_file() or name.endswith(".html"):
            raise HTTPException(404, f"no static file {name!r}")
        kind = {"js": "text/javascript", "css": "text/css"}.get(name.rsplit(".", 1)[-1])
        return Response(path.read_bytes(), media_type=kind or "application/octet-stream")

    @app.get("/api/overview")
    async def overview(request: Request) -> Response:
        return json(await blocking(views.overview, settings, session(request)))

    @app.get("/api/live/overview")
    async def live_overview(request: Request) -> Response:
        """The overview pushed every LIVE_EVERY_S seconds (server-sent events)."""
        s = session(request)

        async def stream() -> AsyncIterator[bytes]:
            while not await request.is_disconnected():
                try:
                    data = await blocking(views.overview, settings, s)
                except Exception as exc:  # shown on the page; the stream goes on
                    data = {"error": f"{type(exc).__name__}: {exc}"}
                yield b"data: " + orjson.dumps(data, default=str) + b"\n\n"
                await asyncio.sleep(LIVE_EVERY_S)

        return Streaming(stream(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-store"})

    @app.get("/api/dead-letters")
    async def dead_letters(
        request: Request, group: str | None = None, error_class: str | None = None,
        event_type: str | None = None, tenant: UUID | None = None,
        since: datetime | None = None, until: datetime | None = None,
    ) -> Response:
        s = session(request)
        if group:
            dlq.check_group(group)
        filters = dlq.Filters(group, error_class or None, None, event_type or None, since,
                              until)
        return json(await blocking(views.dead_letters, settings, s, filters,
                                   str(tenant) if tenant else None))

    def parked_of(s: Session, group: str, aggregate: UUID, tenant: UUID) -> list[dict]:
        if group not in CONSUMER_GROUPS:
            raise HTTPException(422, f"unknown consumer group {group!r}")
        if not s.may_see(tenant):
            raise HTTPException(403, "that aggregate belongs to another tenant")
        return [p for p in dlq.parked(settings, dlq.Filters(group, None, aggregate))
                if p["tenant_id"] == tenant]

    @app.post("/api/dead-letters/retry")
    async def retry(request: Request, body: RetryBody) -> Response:
        s = session(request, action=True)
        parked = await blocking(parked_of, s, body.group, body.aggregate_id, body.tenant_id)
        if not parked:
            raise HTTPException(404, f"{body.aggregate_id} is not parked in {body.group}")
        if body.dry_run:
            waiting = await blocking(dlq.records, settings, dlq.Filters(
                body.group, None, body.aggregate_id))
            return json({"dry_run": True, "would_redrive": [
                {"version": r["version"], "event_type": r["event_type"],
                 "error_class": r["error_class"]} for r in waiting]})
        return json(await blocking(lambda: dlq.retry(settings, body.group, body.aggregate_id,
                                                     body.tenant_id, operator=s.who)))

    @app.post("/api/dead-letters/discard")
    async def discard(request: Request, body: DiscardBody) -> Response:
        s = session(request, action=True)
        if not await blocking(parked_of, s, body.group, body.aggregate_id, body.tenant_id):
            raise HTTPException(404, f"{body.aggregate_id} is not parked in {body.group}")
        released = await blocking(lambda: dlq.discard(settings, body.group, body.aggregate_id,
                                                      body.reason, operator=s.who))
        return json({"released": released})

    @app.get("/api/audit")
    async def audit(request: Request) -> Response:
        return json(await blocking(views.audit, settings, session(request)))

    @app.get("/api/events")
    async def events(
        request: Request, tenant: UUID, aggregate: UUID | None = None,
        correlation: UUID | None = None, as_of: datetime | None = None,
    ) -> Response:
        s = session(request)
        if not s.may_see(tenant):
            raise HTTPException(403, "a tenant admin browses its own tenant only")
        if aggregate is None and correlation is None:
            raise HTTPException(422, "give an aggregate id or a correlation id")
        return json(await blocking(views.events, settings, s, tenant, aggregate, correlation,
                                   as_of))

    def operator_on(request: Request, projector: str, action: str) -> Session:
        """The session of an operator acting on a read model that can be rebuilt."""
        from operations.verify import verifiable

        s = session(request, action=True)
        s.require_operator(action)
        if projector not in verifiable():
            raise HTTPException(422, f"choose one of {', '.join(verifiable())}")
        return s

    @app.post("/api/verify")
    async def verify(request: Request, body: ProjectorBody) -> Response:
        from operations.audit import record_action
        from operations.verify import repair
        from operations.verify import verify as run_verify

        s = operator_on(request, body.projector, "verifying a read model")
        differences = await blocking(run_verify, settings, body.projector, None)
        repaired: list[UUID] = []
        if body.repair and differences:
            repaired = await blocking(repair, settings, body.projector, None, differences)
            await blocking(lambda: record_action(
                settings, "verify.repair", body.projector, None, "repaired",
                details={"aggregates": [str(a) for a in repaired]}, operator=s.who))
        return json({"projector": body.projector, "repaired": repaired, "differences": [
            vars(d) for d in differences]})

    @app.post("/api/rebuilds")
    async def start_rebuild(request: Request, body: ProjectorBody) -> Response:
        from operations.rebuild import rebuild

        s = operator_on(request, body.projector, "rebuilding a read model")
        job = jobs.get(body.projector)
        if job and job["state"] == "running":
            raise HTTPException(409, f"a rebuild of {body.projector} is running")
        job = jobs[body.projector] = {"projector": body.projector, "state": "running",
                                      "lines": [], "result": None, "by": s.who,
                                      "abandon": body.abandon}

        def run() -> None:
            # An unfinished rebuild (say, the console restarted) resumes where it was.
            try:
                job["result"] = rebuild(settings, body.projector, False, False,
                                        lambda line: job["lines"].append(line),
                                        abandon=body.abandon)
                job["state"] = "done"
            except Exception as exc:  # shown on the page and kept in the job
                job["state"], job["result"] = "failed", f"{type(exc).__name__}: {exc}"

        threading.Thread(target=run, daemon=True, name=f"rebuild-{body.projector}").start()
        return json(job, 202)

    @app.get("/api/rebuilds")
    async def rebuilds(request: Request) -> Response:
        session(request).require_operator("seeing rebuilds")
        return json({name: {**job, "lines": job["lines"][-20:]}
                     for name, job in jobs.items()})

    @app.get("/api/live/tail")
    async def tail(request: Request, tenant: UUID | None = None,
                   event_type: Annotated[str | None, Query(alias="type")] = None,
                   aggregate: UUID | None = None) -> Response:
        """Events as they are published, filtered (a tenant admin: its own tenant)."""
        from aiokafka import AIOKafkaConsumer

        s = session(request)
        if tenant is not None and not s.may_see(tenant):
            raise HTTPException(403, "a tenant admin tails its own tenant only")
        only = str(tenant) if tenant else None if s.everything else str(s.principal.tenant_id)
        topics = [t.name for t in (WORKFLOW_EVENTS, DEFINITION_EVENTS, USER_EVENTS)]

        async def stream() -> AsyncIterator[bytes]:
            consumer = AIOKafkaConsumer(*topics, bootstrap_servers=settings.require(
                "kafka_bootstrap"), auto_offset_reset="latest", enable_auto_commit=False)
            await consumer.start()
            try:
                yield b": tailing\n\n"
                while not await request.is_disconnected():
                    batch = await consumer.getmany(timeout_ms=1000)
                    for records in batch.values():
                        for r in records:
                            h = {k: (v or b"").decode() for k, v in r.headers}
                            if (only and h.get("tenant_id") != only) or \
                                    (event_type and h.get("event_type") != event_type) or \
                                    (aggregate and h.get("aggregate_id") != str(aggregate)):
                                continue
                            yield b"data: " + orjson.dumps({
                                "topic": r.topic, "partition": r.partition,
                                "offset": r.offset, **h}) + b"\n\n"
            finally:
                await consumer.stop()

        return Streaming(stream(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-store"})

    @app.get("/api/session")
    async def whoami(request: Request) -> JSONResponse:
        s = session(request)
        return JSONResponse({"name": s.principal.name, "roles": list(s.principal.roles),
                             "tenant_id": str(s.principal.tenant_id),
                             "operator": s.everything, "csrf": s.csrf})

    return app

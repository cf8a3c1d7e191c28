"""RFC 9457 problem details for every error either API returns.

The layers below the edge raise plain exceptions (domain errors, `AppError`s) that know
nothing of HTTP; each API maps them to a status in one table, given to `install`."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from psycopg_pool import PoolTimeout, TooManyRequests
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ringiflow.api")
PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://ringiflow.dev/problems/"
SHED = Counter("ringiflow_requests_shed_total",
               "Requests answered 503 overloaded at once: too many already waited for a "
               "database connection")


class ShedLog:
    """One log line per interval for requests shed under overload, not one each: at
    hundreds per second the log itself would cost the CPU that is short."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s, self.count, self.logged_at = interval_s, 0, float("-inf")

    def shed(self, request: Request) -> None:
        SHED.inc()
        self.count += 1
        now = time.monotonic()
        if now - self.logged_at >= self.interval_s:
            log.warning("%d request(s) shed since the last line (503 overloaded; latest: "
                        "%s %s): more were waiting for a database connection than allowed",
                        self.count, request.method, request.url.path)
            self.count, self.logged_at = 0, now


class AppError(Exception):
    """An application error: what was wrong and what to do (`str(error)`), a `code` for
    machines, and `extra` fields for the problem body. No HTTP: the edge maps its class
    to a status (`install`)."""

    code: ClassVar[str] = "error"

    def __init__(self, detail: str, *, retry_after_s: int | None = None,
                 **extra: Any) -> None:
        super().__init__(detail)
        self.retry_after_s, self.extra = retry_after_s, extra


# An exception class -> (HTTP status, problem title); looked up along the class's MRO.
Statuses = Mapping[type[Exception], tuple[int, str]]


def problem_of(error: Exception, statuses: Statuses) -> Problem | None:
    """The problem an application or domain error answers, or None if unmapped."""
    for cls in type(error).__mro__:
        if cls in statuses:
            status, title = statuses[cls]
            extra = getattr(error, "extra", {})
            retry = getattr(error, "retry_after_s", None)
            return Problem(status, getattr(error, "code", "error"), title, str(error),
                           headers={"Retry-After": str(retry)} if retry else None, **extra)
    return None


class Problem(Exception):
    def __init__(self, status: int, code: str, title: str, detail: str,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.code, self.title, self.detail = status, code, title, detail
        self.headers = headers or {}
        self.extra = extra

    def body(self, instance: str) -> dict[str, Any]:
        return {"type": TYPE_BASE + self.code, "title": self.title, "status": self.status,
                "detail": self.detail, "instance": instance, "code": self.code, **self.extra}


def problem_response(problem: Problem, request: Request) -> JSONResponse:
    return JSONResponse(problem.body(request.url.path), status_code=problem.status,
                        headers=problem.headers, media_type=PROBLEM_JSON)


def _field(loc: tuple[Any, ...]) -> str:
    # ("body", "steps", 0, "name") -> "steps[0].name"; the location kind is kept apart.
    parts = [str(p) for p in loc[1:]] if loc and loc[0] in ("body", "query", "path", "header") \
        else [str(p) for p in loc]
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out or (str(loc[0]) if loc else "request")


def install(app: FastAPI, statuses: Statuses | None = None) -> None:
    """problem+json for every error: `Problem`s as raised, the exceptions `statuses`
    maps (domain and application errors), validation errors, and anything unexpected."""
    shed_log = ShedLog()

    @app.exception_handler(Problem)
    async def on_problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request)

    for error_class in statuses or {}:
        @app.exception_handler(error_class)
        async def on_mapped(request: Request, exc: Exception) -> JSONResponse:
            problem = problem_of(exc, statuses or {})
            assert problem is not None
            return problem_response(problem, request)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": _field(tuple(e.get("loc", ()))), "in": str(e.get("loc", ("body",))[0]),
             "message": e.get("msg", "invalid"), "type": e.get("type")}
            for e in exc.errors()
        ]
        names = ", ".join(sorted({e["field"] for e in errors}))
        problem = Problem(422, "validation_error", "Request is invalid",
                          f"invalid field(s): {names}; see 'errors' for each", errors=errors)
        return problem_response(problem, request)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        problem = Problem(exc.status_code, code, str(exc.detail), str(exc.detail),
                          headers=dict(exc.headers or {}))
        return problem_response(problem, request)

    # Registered by class, not inside the catch-all below: Starlette re-raises whatever
    # reaches the catch-all after answering, and uvicorn logs its traceback again.
    @app.exception_handler(TooManyRequests)
    async def on_shed(request: Request, exc: Exception) -> JSONResponse:
        # Refused at once rather than queued behind a pool that cannot keep up: the
        # requests already admitted keep their latency (load shedding).
        shed_log.shed(request)
        return problem_response(Problem(
            503, "overloaded", "Server overloaded",
            "too many requests are already waiting for a database connection on this "
            "server, so this one was refused at once and nothing was written; retry "
            "after a moment, with fewer requests at once", headers={"Retry-After": "1"}),
            request)

    @app.exception_handler(PoolTimeout)
    async def on_busy(request: Request, exc: Exception) -> JSONResponse:
        # More requests in flight than connections for the pool's whole wait (or none
        # can be made): under overload that is every request, so one line each, no
        # traceback; and not "unreachable", which sent operators after a healthy server.
        log.warning("%s %s: no database connection came free in time (%s)",
                    request.method, request.url.path, exc)
        return problem_response(Problem(
            503, "database_busy", "No database connection free",
            "no connection to PostgreSQL came free in time: this server has more "
            "requests in flight than database connections, or PostgreSQL cannot be "
            "reached; retry after a moment, with fewer requests at once",
            headers={"Retry-After": "1"}), request)

    @app.exception_handler(psycopg.OperationalError)
    async def on_unreachable(request: Request, exc: Exception) -> JSONResponse:
        log.exception("PostgreSQL could not be reached on %s %s", request.method,
                      request.url.path, exc_info=exc)
        return problem_response(Problem(
            503, "database_unavailable", "Database unavailable",
            "PostgreSQL could not be reached; retry shortly", headers={"Retry-After": "2"}),
            request)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Still problem+json, so clients parse every error the same way; the
        # traceback goes to the log, not to the caller.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(Problem(
            500, "internal_error", "Internal error",
            f"the server failed on this request ({type(exc).__name__}); it is in the "
            "server log"), request)

"""Every error either API returns is problem+json, unexpected ones included."""

from __future__ import annotations

import logging

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from psycopg_pool import PoolTimeout, TooManyRequests

from infra.problems import PROBLEM_JSON, install


async def get_failing_with(exc: Exception) -> httpx.Response:
    app = FastAPI()
    install(app)

    @app.get("/boom")
    async def boom() -> None:
        raise exc

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        return await client.get("/boom")


async def test_an_unexpected_error_is_a_500_problem_without_the_traceback() -> None:
    r = await get_failing_with(KeyError("secret-internal-detail"))
    assert r.status_code == 500
    assert r.headers["content-type"] == PROBLEM_JSON
    body = r.json()
    assert body["code"] == "internal_error" and "KeyError" in body["detail"]
    assert "secret-internal-detail" not in r.text


async def test_an_unreachable_database_is_a_503_with_retry_after() -> None:
    r = await get_failing_with(psycopg.OperationalError("connection refused"))
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert r.json()["code"] == "database_unavailable"


async def test_a_pool_with_no_connection_free_is_a_busy_503_not_an_unreachable_database(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "ringiflow.api")
    r = await get_failing_with(PoolTimeout("couldn't get a connection after 10.00 sec"))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    body = r.json()
    assert body["code"] == "database_busy" and "fewer requests at once" in body["detail"]
    logged = [rec for rec in caplog.records if rec.name == "ringiflow.api"]
    assert len(logged) == 1 and logged[0].exc_info is None, "one line, no traceback"


async def test_a_request_shed_under_overload_is_a_503_and_a_flood_of_them_logs_one_line(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "ringiflow.api")
    app = FastAPI()
    install(app)

    @app.post("/commands")
    async def command() -> None:
        raise TooManyRequests("the pool has already 64 requests waiting")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        responses = [await client.post("/commands") for _ in range(50)]
    assert {r.status_code for r in responses} == {503}
    body = responses[0].json()
    assert body["code"] == "overloaded" and "nothing was written" in body["detail"]
    assert responses[0].headers["retry-after"] == "1"
    logged = [rec for rec in caplog.records if rec.name == "ringiflow.api"]
    assert len(logged) == 1 and logged[0].exc_info is None, "one line for the flood"
    assert "POST /commands" in logged[0].getMessage()

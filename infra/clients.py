"""Clients for the four servers, built from settings, plus the readiness probe
each service's /readyz runs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

import redis.asyncio as aioredis
from opensearchpy import AsyncOpenSearch

from infra.settings import Settings

Check = Callable[[], Awaitable[None]]


async def set_tenant(conn: Any, tenant: UUID | str) -> None:
    """Scope `conn`'s transaction to one tenant: row-level security reads it."""
    await conn.execute("SELECT set_config('ringiflow.tenant_id', %s, true)", (str(tenant),))


def redis_client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5,
                                   health_check_interval=30)


def opensearch_client(url: str) -> AsyncOpenSearch:
    return AsyncOpenSearch(hosts=[url], timeout=10, max_retries=0)


async def check_kafka(bootstrap: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        await admin.start()
        await admin.list_topics()
    finally:
        await admin.close()


async def check_redis(url: str) -> None:
    client = redis_client(url)
    try:
        await client.ping()
    finally:
        await client.aclose()


async def check_opensearch(url: str) -> None:
    client = opensearch_client(url)
    try:
        await client.cluster.health()
    finally:
        await client.close()


async def check_postgres(url: str) -> None:
    import psycopg

    from infra.settings import libpq_url

    conn = await psycopg.AsyncConnection.connect(libpq_url(url), connect_timeout=3)
    try:
        await conn.execute("SELECT 1")
    finally:
        await conn.close()


def readiness_checks(settings: Settings, postgres_role: str | None, *servers: str) -> dict[
    str, Check
]:
    """The dependencies one service needs, by name, as zero-argument probes."""
    checks: dict[str, Check] = {}
    if postgres_role:
        url = settings.role_database_url(postgres_role)
        checks["postgres"] = lambda: check_postgres(url)
    if "kafka" in servers:
        checks["kafka"] = lambda: check_kafka(settings.require("kafka_bootstrap"))
    if "redis" in servers:
        checks["redis"] = lambda: check_redis(settings.require("redis_url"))
    if "opensearch" in servers:
        checks["opensearch"] = lambda: check_opensearch(settings.require("opensearch_url"))
    return checks


async def run_checks(checks: dict[str, Check], limit_s: float = 5.0) -> dict[str, str]:
    async def one(check: Check) -> str:
        try:
            await asyncio.wait_for(check(), limit_s)
            return "ok"
        except Exception as exc:
            return f"unreachable: {type(exc).__name__}: {exc}"[:300]

    results = await asyncio.gather(*(one(c) for c in checks.values()))
    return dict(zip(checks, results, strict=True))

"""The query API's PostgreSQL reads: one round trip each, scoped to one tenant, and
a pool that keeps its connections however often waiters give up on their reads."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from uuid import uuid4

import psycopg
import pytest

from infra.settings import Settings, libpq_url
from query_api.reads import Reads

SIZE = 3


@pytest.fixture
async def reads(settings: Settings) -> AsyncIterator[Reads]:
    pool = Reads.pool_for(libpq_url(settings.role_database_url("query")), max_size=SIZE)
    await pool.open(wait=True)
    try:
        yield Reads(pool)
    finally:
        await pool.close()


async def test_waiters_that_give_up_leave_the_pool_whole(reads: Reads) -> None:
    """Consistency waits stop waiting at their deadline, many at once under load.
    Each abandoned read must still give its connection back, idle: a pool that lost
    them would serve every later read from what was left."""
    tenant, rng = uuid4(), random.Random(14)

    async def abandoned() -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(rng.uniform(0, 0.02)):
                await reads._fetch(tenant, "SELECT pg_sleep(0.002)", ())

    await asyncio.gather(*(abandoned() for _ in range(400)))
    deadline = time.monotonic() + 15
    while (stats := reads.pool.get_stats())["pool_available"] < stats["pool_size"]:
        assert time.monotonic() < deadline, f"connections never came back: {stats}"
        await asyncio.sleep(0.05)
    assert stats["pool_size"] == SIZE
    # ...and all of them are usable at once.
    answers = await asyncio.gather(*(reads._fetch(tenant, "SELECT pg_sleep(0.2), 1 AS one", ())
                                     for _ in range(SIZE)))
    assert [a[0]["one"] for a in answers] == [1] * SIZE


async def test_each_read_sees_its_own_tenant_and_a_failed_one_leaves_no_trace(
        reads: Reads) -> None:
    tenants = [uuid4() for _ in range(6)]
    seen = await asyncio.gather(*(
        reads._fetch(t, "SELECT current_setting('ringiflow.tenant_id') AS t", ())
        for t in tenants))
    assert [row[0]["t"] for row in seen] == [str(t) for t in tenants]
    with pytest.raises(psycopg.errors.DivisionByZero):
        await reads._fetch(tenants[0], "SELECT 1/0", ())
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        await reads._fetch(tenants[0], "CREATE TEMP TABLE scratch (x int)", ())
    # The connections that failed went back idle (an aborted transaction would fail
    # these reads), and the next tenant's reads see only that tenant.
    for _ in range(SIZE * 2):
        row = (await reads._fetch(tenants[1], "SELECT current_setting('ringiflow.tenant_id') "
                                  "AS t", ()))[0]
        assert row == {"t": str(tenants[1])}
    assert reads.pool.get_stats()["pool_available"] == reads.pool.get_stats()["pool_size"]

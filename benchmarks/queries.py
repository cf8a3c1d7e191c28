"""Query API throughput (issue 6).

    python -m benchmarks.queries [--seconds 8] [--rounds 3]

On one embedded stack: realistic workflows appended to the event store and
projected into PostgreSQL; the query API (2 processes, as `up` runs it) then
serves, at concurrency 32, a FastAPI no-op (GET /healthz), cached workflow
details (Redis, filled on first read) and list pages (PostgreSQL). Medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time

import aiohttp

from benchmarks.common import (
    BENCH_SECRET,
    add_broker_flag,
    app_process,
    embedded_stack,
    median,
    summary,
)
from contract import EventName
from infra.auth import mint_token
from infra.settings import Settings, libpq_url
from projectors.projection import Delivery
from projectors.workflows.store import WorkflowStore
from tests.events import append
from tests.scenarios import build_world


async def seed(settings: Settings, workflows: int) -> tuple[str, list[str], str]:
    world = build_world(workflows=workflows)
    for event in world.events:
        append(settings.database_url or "", [event])
    store = WorkflowStore(libpq_url(settings.role_database_url("projector")))
    await store.start()
    await store.apply([Delivery(e) for e in world.events])
    await store.close()
    ids = [str(e.aggregate_id) for e in world.events if e.event_type == EventName.WORKFLOW_CREATED]
    user = next(e.aggregate_id for e in world.events if e.event_type == EventName.USER_REGISTERED)
    token = mint_token(BENCH_SECRET, tenant_id=world.tenant_id, user_id=user, name="bench",
                       roles=["user"])
    return token, ids, str(world.tenant_id)


async def load(base: str, paths: list[str], token: str, concurrency: int,
               seconds: float) -> tuple[float, list[float]]:
    headers = {"Authorization": f"Bearer {token}"}
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            rng = random.Random()
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.get(base + rng.choice(paths)) as response:
                    await response.read()
                    assert response.status == 200, response.status
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(latencies) / (time.perf_counter() - started), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workflows", type=int, default=600)
    add_broker_flag(parser)
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}; query API processes: 2; concurrency 32; "
          f"{args.seconds:.0f} s x {args.rounds} rounds, medians")
    with embedded_stack(broker=args.broker) as settings:
        token, ids, _tenant = asyncio.run(seed(settings, args.workflows))
        with app_process("query-api", settings, "RINGIFLOW_QUERY_API_PORT", 2) as base:
            details = [f"/api/v1/queries/workflows/{i}" for i in ids]
            asyncio.run(load(base, details, token, 8, 3))  # warm: fills the cache
            lists = ["/api/v1/queries/workflows?limit=20",
                     "/api/v1/queries/workflows?limit=20&status=in_progress&sort=due"]

            def best(paths: list[str]) -> tuple[float, list[float]]:
                runs = [asyncio.run(load(base, paths, token, 32, args.seconds))
                        for _ in range(args.rounds)]
                return median([r[0] for r in runs]), [x for r in runs for x in r[1]]

            noop, noop_lat = best(["/healthz"])
            print(summary("FastAPI no-op GET /healthz", noop, noop_lat))
            rate, lat = best(details)
            print(summary("cached detail (target >= 2,000/s)", rate, lat, noop, "no-op"))
            rate, lat = best(lists)
            print(summary("list page of 20 (PostgreSQL)", rate, lat, noop, "no-op"))


if __name__ == "__main__":
    main()

"""Command API throughput and latency (issues 3 and 19).

    python -m benchmarks.commands [--seconds 8] [--rounds 3] [--no-fsync]

Prints, from one run on one embedded stack:
  * with `wrk` as the client (a compiled load generator in its own process, 2
    threads, 32 connections): the FastAPI no-op endpoint (GET /healthz of the same
    processes), CreateWorkflow, and AddComment spread over 1,000 workflows;
  * with a Python client (aiohttp, in this process: it takes CPU from the server)
    the no-op and a realistic mix at concurrency 1 and 32 (CreateWorkflow,
    SubmitWorkflow, AddComment, ApproveStep x2 per workflow);
  * sequential appends/s in-process (no HTTP) next to the `eventsourcing`
    library appending to the same PostgreSQL, a round of each in turn
    (`pip install -e '.[bench]'`);
  * the database alone: 16 connections appending through `event_store.append_at`,
    waking the relay after each commit (ADR 0014; one NOTIFY per append, which
    the command API's bell coalesces further) next to a NOTIFY inside each append.
Each figure is the median of --rounds rounds; within a round the wrk targets run
one after another, so each ratio's two sides meet the same moments of the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import threading
import time
from functools import cache
from uuid import UUID, uuid4

import aiohttp
import orjson

from benchmarks import cpu
from benchmarks.common import (
    BENCH_SECRET,
    WrkResult,
    add_broker_flag,
    app_process,
    embedded_stack,
    lua_string,
    median,
    require_wrk,
    summary,
    wrk,
)
from infra.auth import mint_token
from infra.settings import Settings

C = "/api/v1/commands"


class Actors:
    def __init__(self) -> None:
        self.tenant = uuid4()
        self.admin, self.initiator, self.a1, self.a2 = uuid4(), uuid4(), uuid4(), uuid4()

    def headers(self, user: UUID, roles: list[str] | None = None) -> dict[str, str]:
        token = mint_token(BENCH_SECRET, tenant_id=self.tenant, user_id=user, name="bench",
                           roles=roles or ["user"])
        return {"Authorization": f"Bearer {token}"}


async def setup(session: aiohttp.ClientSession, base: str, who: Actors) -> UUID:
    admin = who.headers(who.admin, ["admin"])
    for user in (who.initiator, who.a1, who.a2):
        async with session.post(base + C + "/users", headers=admin, json={
                "user_id": str(user), "display_name": "ベンチ", "email": "b@example.jp"}) as r:
            assert r.status == 201, await r.text()
    async with session.post(base + C + "/definitions", headers=admin, json={
            "name": "bench", "steps": [{"name": "s1", "assignee_id": str(who.a1)},
                                       {"name": "s2", "assignee_id": str(who.a2)}]}) as r:
        return UUID((await r.json())["aggregate_id"])


async def workflow_cycle(session: aiohttp.ClientSession, base: str, who: Actors,
                         definition: UUID, latencies: list[float]) -> None:
    """Five commands on one new workflow, each latency recorded."""
    hi, h1, h2 = who.headers(who.initiator), who.headers(who.a1), who.headers(who.a2)

    async def post(path: str, headers: dict, body: dict) -> dict:
        started = time.perf_counter()
        async with session.post(base + C + path, headers=headers, json=body) as r:
            data = await r.json()
            assert r.status in (200, 201), data
        latencies.append(time.perf_counter() - started)
        return data

    created = await post("/workflows", hi, {"definition_id": str(definition), "title": "bench"})
    wf = created["aggregate_id"]
    await post(f"/workflows/{wf}/submit", hi, {})
    await post(f"/workflows/{wf}/comments", hi, {"body": "コメント"})
    step1, step2 = (str(s) for s in step_ids(UUID(wf)))
    await post(f"/workflows/{wf}/steps/{step1}/approve", h1, {})
    await post(f"/workflows/{wf}/steps/{step2}/approve", h2, {})


def step_ids(workflow_id: UUID) -> tuple[UUID, UUID]:
    from commands.domain.workflow.decide import step_id_of

    return step_id_of(workflow_id, 1), step_id_of(workflow_id, 2)


def wrk_headers(who: Actors) -> str:
    auth = who.headers(who.initiator)["Authorization"]
    return (f'wrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.headers[\"Authorization\"] = {lua_string(auth)}\n")


async def wrk_workloads(base: str) -> tuple[str, str]:
    """wrk scripts: CreateWorkflow (one body, a new workflow each time), and
    AddComment where each wrk thread walks its own half of 1,000 workflows, so no
    two requests in flight touch one stream (no version conflicts)."""
    who = Actors()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as session:
        definition = await setup(session, base, who)
        body = {"definition_id": str(definition), "title": "bench"}
        hi = who.headers(who.initiator)

        async def create() -> str:
            async with session.post(base + C + "/workflows", headers=hi, json=body) as r:
                assert r.status == 201, await r.text()
                return (await r.json())["aggregate_id"]

        workflows: list[str] = []
        for _ in range(10):
            workflows += await asyncio.gather(*(create() for _ in range(100)))
    create_script = (wrk_headers(who) + 'wrk.method = "POST"\n'
                     f"wrk.body = {lua_string(orjson.dumps(body).decode())}\n")
    paths = ", ".join(lua_string(f"{C}/workflows/{w}/comments") for w in workflows)
    comment_script = wrk_headers(who) + f"""
local paths = {{{paths}}}
local half = math.floor(#paths / 2)
local body = {lua_string(orjson.dumps({"body": "コメント"}).decode())}
local threads = 0
offset = 0
local sent = 0
setup = function(thread)
  thread:set("offset", threads * half)
  threads = threads + 1
end
request = function()
  sent = sent + 1
  return wrk.format("POST", paths[offset + sent % half + 1], nil, body)
end
"""
    return create_script, comment_script


async def http_commands(base: str, concurrency: int, seconds: float) -> tuple[float, list[float]]:
    who = Actors()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        definition = await setup(session, base, who)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                await workflow_cycle(session, base, who, definition, latencies)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(latencies) / (time.perf_counter() - started), latencies


async def http_noop(base: str, concurrency: int, seconds: float) -> tuple[float, list[float]]:
    connector = aiohttp.TCPConnector(limit=concurrency)
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.get(base + "/healthz") as r:
                    await r.read()
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(latencies) / (time.perf_counter() - started), latencies


async def inprocess_appends(settings: Settings, seconds: float) -> tuple[float, list[float]]:
    """Sequential AddComment commands through the service layer, no HTTP."""
    from psycopg_pool import AsyncConnectionPool

    from commands import domain
    from commands.bell import OutboxBell
    from commands.cache import StateCache
    from commands.service import CommandContext, Writer, execute
    from contract import new_trace_id
    from infra.auth import Principal
    from infra.settings import libpq_url

    who = Actors()
    principal = Principal(who.tenant, who.initiator, "bench", ("user",))
    workflow = uuid4()
    url = libpq_url(settings.role_database_url("command"))
    bell = OutboxBell(url)
    async with AsyncConnectionPool(url, min_size=1, max_size=2, configure=bell.configure,
                                   kwargs={"autocommit": True, "prepare_threshold": 1}) as pool:
        # As the command API runs: recently written aggregates kept in the process, as
        # the eventsourcing application below keeps its aggregate object; the relay
        # woken after each commit.
        writer = Writer(pool, StateCache(settings.command_state_cache), bell)

        def ctx() -> CommandContext:
            return CommandContext(principal, uuid4(), uuid4(), new_trace_id(), None, None, "")

        first = domain.CreateWorkflow(uuid4(), "d", (domain.ResolvedStep("s", who.a1, "a"),), "b")

        async def create(_reads: object) -> domain.Command:
            return first

        await execute(writer, ctx(), "workflow", workflow, create)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()
        # A fresh aggregate every 10 events keeps the stream short, as real workflows are.
        while time.perf_counter() < deadline:
            if len(latencies) % 10 == 9:
                workflow = uuid4()
                command = domain.CreateWorkflow(uuid4(), "d",
                                                (domain.ResolvedStep("s", who.a1, "a"),), "b")
            else:
                command = domain.AddComment("comment")

            async def build(_reads: object, c: domain.Command = command) -> domain.Command:
                return c

            t0 = time.perf_counter()
            await execute(writer, ctx(), "workflow", workflow, build,
                          new=isinstance(command, domain.CreateWorkflow))
            latencies.append(time.perf_counter() - t0)
        rate = len(latencies) / (time.perf_counter() - started)
        await bell.close()
        return rate, latencies


@cache
def _ringi_aggregate() -> type:
    """Defined once: the library refuses a second class registered under one topic,
    which a class body inside the round function would be from round two on."""
    from eventsourcing.domain import Aggregate, event

    class Ringi(Aggregate):
        @event("Created")
        def __init__(self) -> None:
            self.comments: list[str] = []

        @event("CommentAdded")
        def add_comment(self, body: str) -> None:
            self.comments.append(body)

    return Ringi


def eventsourcing_appends(settings: Settings, seconds: float) -> tuple[float, list[float]]:
    """The `eventsourcing` library saving one event per transaction, sequentially."""
    from urllib.parse import unquote, urlsplit

    from eventsourcing.application import Application

    Ringi = _ringi_aggregate()
    url = urlsplit(settings.database_url or "")
    env = {"PERSISTENCE_MODULE": "eventsourcing.postgres", "POSTGRES_DBNAME": url.path[1:],
           "POSTGRES_HOST": url.hostname or "", "POSTGRES_PORT": str(url.port),
           "POSTGRES_USER": url.username or "", "POSTGRES_PASSWORD": unquote(url.password or ""),
           "POSTGRES_SCHEMA": "eventsourcing_bench", "CREATE_TABLE": "y"}
    import psycopg

    with psycopg.connect(settings.database_url or "", autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS eventsourcing_bench")
    app = Application(env=env)
    latencies: list[float] = []
    aggregate = Ringi()
    app.save(aggregate)
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        if len(latencies) % 10 == 9:
            aggregate = Ringi()
        else:
            aggregate.add_comment("comment")
        t0 = time.perf_counter()
        app.save(aggregate)
        latencies.append(time.perf_counter() - t0)
    app.close()
    return len(latencies) / (time.perf_counter() - started), latencies


def database_appends(settings: Settings, seconds: float, notify_inside: bool,
                     connections: int = 16) -> tuple[float, list[float]]:
    """Appends/s of `connections` threads, each appending one event per statement to
    streams of ten on a connection of the command role. `notify_inside`: the outbox
    trigger's NOTIFY in the append's transaction; else the relay is woken by a
    NOTIFY of its own after each commit."""
    import psycopg

    from commands.bell import SETTING
    from commands.store import outbox_items
    from contract import OUTBOX_NOTIFY_CHANNEL
    from infra.settings import libpq_url
    from tests.events import comment_envelope

    url = libpq_url(settings.role_database_url("command"))
    latencies: list[float] = []

    def appender() -> None:
        mine: list[float] = []
        tenant = uuid4()
        with psycopg.connect(url, autocommit=True, prepare_threshold=1) as conn:
            if not notify_inside:
                conn.execute("SELECT set_config(%s, 'after_commit', false)", (SETTING,))
            aggregate, version = uuid4(), 0
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                if version == 10:
                    aggregate, version = uuid4(), 0
                envelope = comment_envelope(tenant, aggregate, version + 1)
                items = outbox_items([envelope])
                t0 = time.perf_counter()
                conn.execute("SELECT * FROM event_store.append_at(%s, 'workflow', %s, %s, %s, %b)",
                             (tenant, aggregate, version, *items)).fetchall()
                if not notify_inside:
                    conn.execute("SELECT pg_notify(%s, '')", (OUTBOX_NOTIFY_CHANNEL,))
                mine.append(time.perf_counter() - t0)
                version += 1
        latencies.extend(mine)

    threads = [threading.Thread(target=appender, daemon=True) for _ in range(connections)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(latencies) / (time.perf_counter() - started), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2,
                        help="command API processes on the port (as `ringiflow up` runs)")
    parser.add_argument("--no-fsync", action="store_true",
                        help="embedded PostgreSQL without fsync (the tests' setting)")
    add_broker_flag(parser)
    args = parser.parse_args()
    # Checked first, not after a minute of HTTP figures (where it used to crash).
    if importlib.util.find_spec("eventsourcing") is None:
        raise SystemExit("the baseline library `eventsourcing` is not installed: "
                         "pip install -e '.[bench]'")
    require_wrk()

    def medians(runs: list[tuple[float, list[float]]]) -> tuple[float, list[float]]:
        return median([r[0] for r in runs]), [lat for r in runs for lat in r[1]]

    def best_of(fn, *a) -> tuple[float, list[float]]:
        return medians([fn(*a) for _ in range(args.rounds)])

    def wrk_medians(*targets: tuple[str, str]) -> list[tuple[WrkResult, list[tuple[str, float]]]]:
        """The median round of each target; a round runs each target in turn, so the
        no-op baseline meets the same moments of a shared machine as the commands."""
        runs: list[list[tuple[WrkResult, list[tuple[str, float]]]]] = [[] for _ in targets]
        for _ in range(args.rounds):
            for into, (url, script) in zip(runs, targets, strict=True):
                into.append(cpu.during(lambda u=url, s=script: wrk(u, s, args.seconds), "wrk"))
        return [sorted(r, key=lambda one: one[0].rate)[len(r) // 2] for r in runs]

    print(f"cores: {os.cpu_count()}, fsync: {not args.no_fsync}, command API processes: "
          f"{args.processes}, {args.seconds:.0f} s x {args.rounds} rounds, medians")
    with embedded_stack(fsync=not args.no_fsync, broker=args.broker) as settings:
        with app_process("command-api", settings, "RINGIFLOW_COMMAND_API_PORT",
                         args.processes) as base:
            asyncio.run(http_noop(base, 8, 1))  # warm-up
            create_script, comment_script = asyncio.run(wrk_workloads(base))
            wrk_noop, creates, comments = wrk_medians(
                (base + "/healthz", ""), (base + C + "/workflows", create_script),
                (base, comment_script))
            # Each with where the machine's CPU went in that round: wrk shares the cores.
            print(wrk_noop[0].line("wrk: FastAPI no-op GET /healthz, c=32"))
            print(f"  {cpu.report(wrk_noop[1])}")
            print(creates[0].line("wrk: CreateWorkflow, c=32", wrk_noop[0].rate, "no-op"))
            print(f"  {cpu.report(creates[1])}")
            print(comments[0].line("wrk: AddComment, c=32", wrk_noop[0].rate, "no-op"))
            print(f"  {cpu.report(comments[1])}")
            noop, noop_lat = best_of(lambda: asyncio.run(http_noop(base, 32, args.seconds)))
            print(summary("aiohttp: FastAPI no-op, c=32", noop, noop_lat))
            for concurrency in (1, 32):
                rate, lat = best_of(lambda c=concurrency: asyncio.run(
                    http_commands(base, c, args.seconds)))
                print(summary(f"aiohttp: command mix, c={concurrency}", rate, lat, noop,
                              "no-op"))
        # Round for round in turn, so both sides meet the same moments of a shared machine.
        es_runs, our_runs = [], []
        for _ in range(args.rounds):
            es_runs.append(eventsourcing_appends(settings, args.seconds))
            our_runs.append(asyncio.run(inprocess_appends(settings, args.seconds)))
        (es_rate, es_lat), (ours, ours_lat) = medians(es_runs), medians(our_runs)
        print(summary("eventsourcing library, sequential saves", es_rate, es_lat))
        print(summary("RingiFlow, sequential commands in-process", ours, ours_lat, es_rate,
                      "eventsourcing"))
        inside, inside_lat = best_of(database_appends, settings, args.seconds, True)
        print(summary("database: append_at x16, NOTIFY inside", inside, inside_lat))
        after, after_lat = best_of(database_appends, settings, args.seconds, False)
        print(summary("database: append_at x16, NOTIFY after", after, after_lat, inside,
                      "NOTIFY inside"))


if __name__ == "__main__":
    main()

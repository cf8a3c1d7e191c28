"""`ringiflow rebuild <projector>`: blue/green rebuilds (ADR 0005).

A new version of the read model -- a PostgreSQL schema, a Redis key namespace,
an OpenSearch index -- is filled from the events table (which holds the whole
history even when Kafka no longer does), caught up, checked, and put live in one
atomic step: the `read_model` views replaced in one transaction, the namespace
pointer key set, the alias moved. Readers never see a missing or half-built
model. The previous version is kept until `--drop-old`.

Each version's progress is kept in `streams.rebuilds`, so a rebuild that
crashed resumes where it stopped. Passes read `position > p OR transaction_id
>= x`, where x is the oldest transaction a previous pass could not see yet: an
event whose transaction committed after its neighbours (positions are taken at
insert, not at commit) is still read. Stores are idempotent, so re-reading is
harmless.

After the cut-over one more pass copies what the live projector wrote to the
old version in the moment before; from then on it writes the new one."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads

from contract import stored_envelope
from infra.clients import opensearch_client, redis_client
from infra.settings import Settings, libpq_url
from projectors.cache_store import NAMESPACE_KEY, CacheStore
from projectors.catalogue import CATALOGUE
from projectors.projection import Delivery, NonRetryable, Retryable, Store
from projectors.search_store import SearchStore, create_index
from projectors.workflow_store import WorkflowStore

log = logging.getLogger("ringiflow.rebuild")
Progress = Callable[[str], None]
READ_MODEL_TABLES = ("workflow_read_models", "workflow_steps", "workflow_history", "my_tasks",
                     "users", "definitions")
COLUMNS = ("position, event_id, event_type, schema_version, aggregate_type, aggregate_id, "
           "version, occurred_at, payload, aggregate, metadata")


def _number(version: str) -> int:
    match = re.search(r"v(\d+):?$", version)
    return int(match.group(1)) if match else 0


class RefusedCutOver(RuntimeError):
    """The new version is not complete; the live one stays."""


class RebuildFailed(RuntimeError):
    """A pass stopped; the rebuild stays resumable."""


class Versions(ABC):
    """How one projector's read model is versioned, built and switched."""

    projector: str
    aggregate_types: tuple[str, ...]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database_url = libpq_url(settings.require("database_url"))

    @abstractmethod
    async def live(self) -> str | None: ...

    @abstractmethod
    async def existing(self) -> list[str]: ...

    def next_version(self, known: list[str]) -> str:
        return self.named(max([_number(v) for v in known] or [0]) + 1)

    @abstractmethod
    def named(self, number: int) -> str: ...

    @abstractmethod
    async def create(self, target: str, live: str | None) -> None: ...

    @abstractmethod
    def store(self, target: str) -> Store: ...

    @abstractmethod
    async def count(self, target: str) -> int:
        """Workflows the version holds (checked before it goes live)."""

    @abstractmethod
    async def cut_over(self, target: str, live: str | None) -> None: ...

    @abstractmethod
    async def drop(self, version: str) -> None: ...

    async def close(self) -> None:
        return None


class PostgresVersions(Versions):
    """`read_model_vN` schemas; `read_model` holds views over the live one."""

    projector = "workflow-projector"
    aggregate_types = ("workflow", "definition", "user")

    def _connect(self, **kwargs: Any) -> psycopg.Connection:
        return psycopg.connect(self.database_url, **kwargs)

    async def live(self) -> str | None:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT DISTINCT n.nspname FROM pg_rewrite r "
                "JOIN pg_depend d ON d.objid = r.oid "
                "JOIN pg_class c ON c.oid = d.refobjid AND c.oid <> r.ev_class "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE r.ev_class = 'read_model.workflow_read_models'::regclass").fetchone()
        return row[0] if row else None

    async def existing(self) -> list[str]:
        with self._connect() as conn:
            return [r[0] for r in conn.execute(
                r"SELECT nspname FROM pg_namespace WHERE nspname ~ '^read_model_v\d+$'")]

    def named(self, number: int) -> str:
        return f"read_model_v{number}"

    async def create(self, target: str, live: str | None) -> None:
        """Same tables, indexes, row-level security and grants as the live version,
        empty; in one transaction, so a crash leaves all of it or nothing."""
        source = live or "read_model_v1"
        with self._connect() as conn, conn.transaction():
            schema = sql.Identifier(target)
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO ringiflow_projector, "
                                 "ringiflow_query").format(schema))
            for table in READ_MODEL_TABLES:
                new = sql.Identifier(target, table)
                conn.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(
                    new, sql.Identifier(source, table)))
                conn.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(new))
                conn.execute(sql.SQL("ALTER TABLE {} FORCE ROW LEVEL SECURITY").format(new))
                policies = conn.execute(
                    "SELECT policyname, permissive, roles, cmd, qual, with_check "
                    "FROM pg_policies WHERE schemaname = %s AND tablename = %s",
                    (source, table)).fetchall()
                for name, permissive, roles, cmd, qual, check in policies:
                    to = sql.SQL(", ").join(sql.SQL("PUBLIC") if r == "public"
                                            else sql.Identifier(r) for r in roles)
                    statement = sql.SQL("CREATE POLICY {} ON {} AS {} FOR {} TO {}").format(
                        sql.Identifier(name), new, sql.SQL(permissive), sql.SQL(cmd), to)
                    if qual:
                        statement += sql.SQL(" USING ({})").format(sql.SQL(qual))
                    if check:
                        statement += sql.SQL(" WITH CHECK ({})").format(sql.SQL(check))
                    conn.execute(statement)
                conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO "
                                     "ringiflow_projector").format(new))
                conn.execute(sql.SQL("GRANT SELECT ON {} TO ringiflow_query").format(new))

    def store(self, target: str) -> Store:
        return WorkflowStore(self.database_url, schema=target)

    async def count(self, target: str) -> int:
        with self._connect() as conn:
            return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                sql.Identifier(target, "workflow_read_models"))).fetchone()[0]  # type: ignore[index]

    async def cut_over(self, target: str, live: str | None) -> None:
        """Replace every view in one transaction. All six locks are taken by one
        statement bounded below deadlock_timeout: if it collides with readers or
        the live projector, it is this transaction that gives up (and tries
        again), never their statements, and nobody queues behind it for long."""
        views = sql.SQL(", ").join(sql.Identifier("read_model", t) for t in READ_MODEL_TABLES)
        for attempt in range(40):
            try:
                with self._connect() as conn, conn.transaction():
                    conn.execute("SET LOCAL statement_timeout = '300ms'")
                    conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(views))
                    conn.execute("SET LOCAL statement_timeout = 0")
                    for table in READ_MODEL_TABLES:
                        conn.execute(sql.SQL(
                            "CREATE OR REPLACE VIEW {} WITH (security_invoker = true) AS "
                            "SELECT * FROM {}").format(sql.Identifier("read_model", table),
                                                       sql.Identifier(target, table)))
                return
            except (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable):
                await asyncio.sleep(0.05 * (attempt + 1))
        raise RefusedCutOver("could not replace the read_model views: readers or the live "
                             "projector held them for 40 attempts; retry when quieter")

    async def drop(self, version: str) -> None:
        # RESTRICT: if the read_model views still used these tables, this fails
        # instead of taking the views with it.
        with self._connect() as conn, conn.transaction():
            tables = sql.SQL(", ").join(sql.Identifier(version, t) for t in READ_MODEL_TABLES)
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {} RESTRICT").format(tables))
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} RESTRICT").format(
                sql.Identifier(version)))


class RedisVersions(Versions):
    """Key namespaces: "" for v1, "v2:", "v3:" ...; the pointer key names the live one."""

    projector = "cache-projector"
    aggregate_types = ("workflow", "user")
    V1_FAMILIES = ("workflow:", "wfver:", "wfstatus:", "stats:", "overdue:", "usernames:",
                   "userver:")

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.client = redis_client(settings.require("redis_url"))

    @staticmethod
    def namespace(version: str) -> str:
        return "" if version == "v1" else f"{version}:"

    def named(self, number: int) -> str:
        return f"v{number}"

    async def live(self) -> str | None:
        pointer = ((await self.client.get(NAMESPACE_KEY)) or b"").decode()
        return pointer.rstrip(":") or "v1"

    async def existing(self) -> list[str]:
        with psycopg.connect(self.database_url) as conn:
            known = [r[0] for r in conn.execute(
                "SELECT target FROM streams.rebuilds WHERE projector = %s "
                "AND status <> 'dropped'", (self.projector,))]
        return [*known, (await self.live()) or "v1"]

    async def _delete(self, version: str) -> int:
        patterns = [f"{f}*" for f in self.V1_FAMILIES] if version == "v1" \
            else [f"{self.namespace(version)}*"]
        deleted = 0
        for pattern in patterns:
            batch: list[bytes] = []
            async for key in self.client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += await self.client.unlink(*batch)
                    batch = []
            if batch:
                deleted += await self.client.unlink(*batch)
        return deleted

    async def create(self, target: str, live: str | None) -> None:
        await self._delete(target)  # keys an unrecorded earlier attempt left behind

    def store(self, target: str) -> Store:
        return CacheStore(self.settings.require("redis_url"), namespace=self.namespace(target))

    async def count(self, target: str) -> int:
        total = 0
        async for key in self.client.scan_iter(match=f"{self.namespace(target)}wfver:*",
                                               count=1000):
            total += await self.client.hlen(key)
        return total

    async def cut_over(self, target: str, live: str | None) -> None:
        if target == "v1":
            await self.client.delete(NAMESPACE_KEY)
        else:
            await self.client.set(NAMESPACE_KEY, self.namespace(target))

    async def drop(self, version: str) -> None:
        await self._delete(version)

    async def close(self) -> None:
        await self.client.aclose()


class SearchVersions(Versions):
    """Indices `<alias>-vN`; the alias names the live one."""

    projector = "search-indexer"
    aggregate_types = ("workflow",)

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.alias = settings.search_alias
        self.client = opensearch_client(settings.require("opensearch_url"))

    def named(self, number: int) -> str:
        return f"{self.alias}-v{number}"

    async def live(self) -> str | None:
        if not await self.client.indices.exists_alias(name=self.alias):
            return None
        return sorted(await self.client.indices.get_alias(name=self.alias))[0]

    async def existing(self) -> list[str]:
        pattern = f"{self.alias}-v*"
        return list(await self.client.indices.get(index=pattern)) \
            if await self.client.indices.exists(index=pattern) else []

    async def create(self, target: str, live: str | None) -> None:
        if await self.client.indices.exists(index=target):
            await self.client.indices.delete(index=target)  # an unrecorded earlier attempt
        try:
            await create_index(self.client, target)
        except NonRetryable as exc:  # the CLI reports RuntimeErrors as errors, exit 2
            raise RuntimeError(str(exc)) from exc

    def store(self, target: str) -> Store:
        return SearchStore(self.settings.require("opensearch_url"), alias=target)

    async def count(self, target: str) -> int:
        await self.client.indices.refresh(index=target)
        return int((await self.client.count(index=target))["count"])

    async def cut_over(self, target: str, live: str | None) -> None:
        current = list(await self.client.indices.get_alias(name=self.alias)) \
            if await self.client.indices.exists_alias(name=self.alias) else []
        actions: list[dict[str, Any]] = [{"remove": {"index": i, "alias": self.alias}}
                                         for i in current]
        actions.append({"add": {"index": target, "alias": self.alias}})
        await self.client.indices.update_aliases(body={"actions": actions})

    async def drop(self, version: str) -> None:
        if await self.client.indices.exists(index=version):
            await self.client.indices.delete(index=version)

    async def close(self) -> None:
        await self.client.close()


VERSIONS: dict[str, type[Versions]] = {v.projector: v for v in (
    PostgresVersions, RedisVersions, SearchVersions)}


@dataclass
class Rebuild:
    projector: str
    live: str | None
    target: str
    resume: bool
    events: int
    workflows: int
    position: int = 0
    open_xmin: int | None = None
    events_done: int = 0
    swapped_from: str | None = None
    kept: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Bookkeeping:
    """streams.rebuilds: what is being built, how far it got, what is live."""

    def __init__(self, database_url: str, projector: str) -> None:
        self.conn = psycopg.connect(database_url, autocommit=True, row_factory=dict_row)
        self.projector = projector

    def lock(self) -> None:
        """One rebuild per projector at a time (held until the connection closes)."""
        got = self.conn.execute("SELECT pg_try_advisory_lock(hashtext(%s)) AS got",
                                (f"ringiflow.rebuild:{self.projector}",)).fetchone()
        if not got or not got["got"]:
            raise RebuildFailed(f"another `ringiflow rebuild {self.projector}` is running; "
                                "wait for it (or stop it) and run this again")

    def building(self) -> dict[str, Any] | None:
        return self.conn.execute("SELECT * FROM streams.rebuilds WHERE projector = %s "
                                 "AND status = 'building'", (self.projector,)).fetchone()

    def start(self, target: str, replaces: str | None, events: int) -> None:
        self.conn.execute(
            "INSERT INTO streams.rebuilds (projector, target, replaces, status, events_total) "
            "VALUES (%s, %s, %s, 'building', %s) ON CONFLICT (projector, target) DO UPDATE "
            "SET status = 'building', replaces = EXCLUDED.replaces, "
            "events_total = EXCLUDED.events_total, position = 0, open_xmin = NULL, "
            "events_done = 0, started_at = clock_timestamp()",
            (self.projector, target, replaces, events))

    def progress(self, plan: Rebuild) -> None:
        self.conn.execute(
            "UPDATE streams.rebuilds SET position = %s, open_xmin = %s, events_done = %s, "
            "updated_at = clock_timestamp() WHERE projector = %s AND target = %s",
            (plan.position, plan.open_xmin, plan.events_done, self.projector, plan.target))

    def set_live(self, target: str, previous: str | None) -> None:
        with self.conn.transaction():
            if previous:
                self.conn.execute(
                    "INSERT INTO streams.rebuilds (projector, target, status) "
                    "VALUES (%s, %s, 'retired') ON CONFLICT (projector, target) DO UPDATE "
                    "SET status = 'retired', updated_at = clock_timestamp()",
                    (self.projector, previous))
            self.conn.execute(
                "UPDATE streams.rebuilds SET status = 'live', live_at = clock_timestamp(), "
                "updated_at = clock_timestamp() WHERE projector = %s AND target = %s",
                (self.projector, target))

    def dropped(self, version: str) -> None:
        self.conn.execute(
            "INSERT INTO streams.rebuilds (projector, target, status) VALUES (%s, %s, "
            "'dropped') ON CONFLICT (projector, target) DO UPDATE SET status = 'dropped', "
            "updated_at = clock_timestamp()", (self.projector, version))

    def close(self) -> None:
        self.conn.close()


def _counts(database_url: str, aggregate_types: tuple[str, ...]) -> tuple[int, int]:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT aggregate_id) FILTER (WHERE aggregate_type = "
            "'workflow') FROM event_store.events WHERE aggregate_type = ANY(%s)",
            (list(aggregate_types),)).fetchone()
    return row[0], row[1]  # type: ignore[index]


async def _pass(versions: Versions, store: Store, plan: Rebuild, book: Bookkeeping, *,
                label: str, handles: Callable[[str], bool], progress: Progress, batch: int,
                max_rate: float | None) -> int:
    """Apply every event not yet covered, in position order; returns how many."""
    started, done, start_position = time.monotonic(), 0, plan.position
    with psycopg.connect(versions.database_url, row_factory=dict_row) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        set_json_loads(orjson.loads, conn)
        # The snapshot the cursor below reads; transactions it cannot see yet
        # are at or after its xmin.
        xmin = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint "
                            "AS x").fetchone()["x"]  # type: ignore[index]
        covered = "position > %(after)s" if plan.open_xmin is None else \
            "(position > %(after)s OR transaction_id >= %(xmin)s::text::xid8)"
        cur = conn.cursor(name="rebuild")
        cur.execute(f"SELECT {COLUMNS} FROM event_store.events WHERE {covered} "
                    "AND aggregate_type = ANY(%(types)s) ORDER BY position",
                    {"after": plan.position, "xmin": plan.open_xmin,
                     "types": list(versions.aggregate_types)})

        def fetch() -> tuple[list[dict[str, Any]], list[Delivery]]:
            rows = cur.fetchmany(batch)
            deliveries = [Delivery(stored_envelope(
                {k: v for k, v in r.items() if k != "position"}), replay=True) for r in rows]
            return rows, [d for d in deliveries if handles(d.envelope.event_type)]

        # Read and decode batch N+1 (PostgreSQL and a thread) while batch N is applied.
        ahead = asyncio.ensure_future(asyncio.to_thread(fetch))
        try:
            while True:
                rows, deliveries = await ahead
                if not rows:
                    break
                ahead = asyncio.ensure_future(asyncio.to_thread(fetch))
                if deliveries:
                    await store.apply(deliveries)
                plan.position = max(plan.position, rows[-1]["position"])
                if rows[-1]["position"] > start_position:
                    # Past the old resume point, every row the old bound still owed is
                    # applied (rows come in position order): the bound is now this
                    # snapshot's.
                    plan.open_xmin = xmin
                done += len(rows)
                plan.events_done += len(rows)
                book.progress(plan)
                if max_rate:  # throttle: leave the database to the live traffic
                    await asyncio.sleep(max(done / max_rate - (time.monotonic() - started), 0))
                rate = done / max(time.monotonic() - started, 1e-6)
                left = max(plan.events - plan.events_done, 0)
                progress(f"{label}: {plan.events_done:,}/{plan.events:,} events, "
                         f"{rate:,.0f} events/s, ETA {left / rate:.0f} s")
        finally:
            if not ahead.done():  # the cursor must be idle before its connection closes
                await asyncio.wait([ahead])
            if not ahead.cancelled() and ahead.exception() is not None:
                log.debug("prefetch after the failure: %s", ahead.exception())
    # Everything this snapshot saw is applied; what it could not see is >= xmin.
    plan.open_xmin = xmin
    book.progress(plan)
    return done


async def _guarded(copying: Any, plan: Rebuild, label: str) -> None:
    try:
        await copying
    except (psycopg.Error, ValueError, LookupError, Retryable, NonRetryable) as exc:
        raise RebuildFailed(
            f"{plan.target}: the {label} pass stopped after position {plan.position}: "
            f"{type(exc).__name__}: {exc}. Fix the cause and run the same command again; "
            "it resumes from there") from exc


async def run_rebuild(settings: Settings, projector: str, dry_run: bool = False,
                      drop_old: bool = False, progress: Progress = lambda _m: None,
                      batch: int = 1000, max_rate: float | None = None,
                      abandon: bool = False) -> Rebuild:
    if projector not in VERSIONS:
        raise ValueError(f"{projector} has no versioned read model to rebuild; rebuild one "
                         f"of {', '.join(VERSIONS)} (derived topics are re-derived by replay)")
    versions = VERSIONS[projector](settings)
    book = Bookkeeping(versions.database_url, projector)
    started = time.monotonic()
    try:
        if not dry_run:
            book.lock()
        live = await versions.live()
        events, workflows = _counts(versions.database_url, versions.aggregate_types)
        unfinished = book.building()
        if unfinished:
            plan = Rebuild(projector, unfinished["replaces"], unfinished["target"], True,
                           events, workflows, unfinished["position"], unfinished["open_xmin"],
                           unfinished["events_done"])
        else:
            target = versions.next_version([*await versions.existing(), *([live] if live
                                                                          else [])])
            plan = Rebuild(projector, live, target, False, events, workflows)
        # Cut over already (crashed in the pass after it): only that pass is left.
        switched = plan.resume and plan.target == live
        if abandon:
            if not plan.resume:
                raise ValueError(f"no {projector} rebuild is in progress; nothing to abandon")
            if switched:
                raise ValueError(f"{plan.target} is already live; run `ringiflow rebuild "
                                 f"{projector}` to finish it (nothing to abandon)")
            if not dry_run:
                await versions.drop(plan.target)
                book.dropped(plan.target)
                plan.dropped.append(plan.target)
            return plan
        if dry_run:
            return plan
        if not plan.resume:
            # Created before it is recorded: a recorded target always exists.
            await versions.create(plan.target, live)
            book.start(plan.target, live, events)
        progress(f"{'resuming' if plan.resume else 'building'} {plan.target} "
                 f"(live: {live or 'none'}) from {events:,} events")
        declared = CATALOGUE[projector](settings)
        await declared.store.close()  # only its declaration (which events) is needed
        store = versions.store(plan.target)
        try:
            await store.start()
            copy = functools.partial(_pass, versions, store, plan, book,
                                     handles=declared.handles, progress=progress, batch=batch,
                                     max_rate=max_rate)
            if not switched:
                for label in ("copy", "catch-up"):
                    await _guarded(copy(label=label), plan, label)
                have = await versions.count(plan.target)
                if have < workflows:
                    raise RefusedCutOver(
                        f"{plan.target} holds {have} workflows, the events table {workflows}; "
                        f"{live or 'the live version'} stays live and {plan.target} is kept "
                        f"for inspection. `ringiflow rebuild {projector} --abandon` discards it")
                await versions.cut_over(plan.target, live)
                progress(f"{plan.target} is live (was {plan.live or 'none'})")
            # What the live projector wrote to the old version just before the switch;
            # until this pass is done the rebuild stays resumable (status building).
            await _guarded(copy(label="after cut-over"), plan, "after cut-over")
            book.set_live(plan.target, plan.live)
            plan.swapped_from = plan.live
        finally:
            await store.close()
        plan.seconds = round(time.monotonic() - started, 2)  # building and going live
        now_live = await versions.live()
        previous = sorted({v for v in await versions.existing()
                           if v not in (plan.target, now_live)}, key=_number)
        for version in previous if drop_old else []:
            await versions.drop(version)
            book.dropped(version)
            plan.dropped.append(version)
        plan.kept = [v for v in previous if v not in plan.dropped]
        return plan
    finally:
        book.close()
        await versions.close()


def rebuild(settings: Settings, projector: str, dry_run: bool, drop_old: bool,
            progress: Progress, batch: int = 1000, max_rate: float | None = None,
            abandon: bool = False) -> dict[str, Any]:
    return asdict(asyncio.run(run_rebuild(settings, projector, dry_run, drop_old, progress,
                                          batch, max_rate, abandon)))

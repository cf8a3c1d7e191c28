"""Blue/green rebuilds of a read model (`ringiflow rebuild <projector>`, ADR 0005).

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
old version in the moment before; from then on it writes the new one.

How a version is created, filled, counted, switched and dropped is the read model's own
business (`projectors.versioned`, found through the catalogue); this module only runs
the passes, keeps the book and decides when to switch."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads

from contract import stored_envelope
from infra.settings import Settings
from projectors.catalogue import CATALOGUE, VERSIONED, versioned
from projectors.projection import Delivery, NonRetryable, Retryable, Store
from projectors.versioned import RefusedCutOver, VersionedStore, version_number

log = logging.getLogger("ringiflow.rebuild")
Progress = Callable[[str], None]
COLUMNS = ("position, event_id, event_type, schema_version, aggregate_type, aggregate_id, "
           "version, occurred_at, payload, aggregate, metadata")


class RebuildFailed(RuntimeError):
    """A pass stopped; the rebuild stays resumable."""


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


async def _pass(versions: VersionedStore, store: Store, plan: Rebuild, book: Bookkeeping, *,
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
    versions_of = versioned(projector)
    if versions_of is None:
        raise ValueError(f"{projector} has no versioned read model to rebuild; rebuild one "
                         f"of {', '.join(VERSIONED)} (derived topics are re-derived by replay)")
    versions = versions_of(settings)
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
                           if v not in (plan.target, now_live)}, key=version_number)
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

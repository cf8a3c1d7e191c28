"""ADR 0014: the command API's appends send no NOTIFY inside their transaction (which
would serialise their commits on a database-wide lock); the bell wakes the relay
after each commit instead, and every other writer still notifies as before."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from uuid import UUID

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from commands import domain, handlers
from commands.bell import OutboxBell
from commands.cache import StateCache
from commands.service import Writer
from contract import OUTBOX_NOTIFY_CHANNEL
from infra.settings import Settings, libpq_url
from tests.integration.test_state_cache import Office

QUIET_S = 0.5  # a NOTIFY arrives within milliseconds; none in this long means none was sent


class Listener:
    """What the relay hears: a LISTEN connection, as the admin (it sees every row)."""

    def __init__(self, conn: psycopg.AsyncConnection) -> None:
        self.conn = conn

    async def next(self, timeout_s: float) -> bool:
        """Whether a notification arrives within the timeout."""
        gen = self.conn.notifies(timeout=timeout_s, stop_after=1)
        return [n async for n in gen] != []

    async def drain(self) -> None:
        while await self.next(QUIET_S):
            pass

    async def outbox_has(self, workflow: UUID) -> int:
        cur = await self.conn.execute(
            "SELECT count(*) FROM event_store.outbox WHERE aggregate_id = %s", (workflow,))
        row = await cur.fetchone()
        return int(row[0]) if row else 0


@pytest.fixture
async def listener(settings: Settings) -> AsyncIterator[Listener]:
    async with await psycopg.AsyncConnection.connect(libpq_url(settings.database_url or ""),
                                                     autocommit=True) as conn:
        await conn.execute(f"LISTEN {OUTBOX_NOTIFY_CHANNEL}")
        yield Listener(conn)


def command_url(settings: Settings) -> str:
    return libpq_url(settings.role_database_url("command"))


@pytest.fixture
async def bell(settings: Settings) -> AsyncIterator[OutboxBell]:
    bell = OutboxBell(command_url(settings))
    yield bell
    await bell.close()


@pytest.fixture
async def bell_pool(settings: Settings, bell: OutboxBell) -> AsyncIterator[AsyncConnectionPool]:
    """A pool as the command API opens it: its appends leave the NOTIFY to the bell."""
    async with AsyncConnectionPool(command_url(settings), min_size=1, max_size=4,
                                   configure=bell.configure,
                                   kwargs={"autocommit": True}) as pool:
        yield pool


async def test_the_bell_wakes_the_relay_after_the_commit(
        bell_pool: AsyncConnectionPool, bell: OutboxBell, listener: Listener) -> None:
    writer = Writer(bell_pool, StateCache(100), bell)
    office = Office()
    definition = await office.setup(writer)
    await listener.drain()
    sent = bell.sent
    workflow = await office.workflow(writer, definition)
    assert await listener.next(5.0), "no NOTIFY after the append committed"
    # Sent after the commit: whoever is woken finds the row.
    assert await listener.outbox_has(workflow) == 1
    assert bell.sent == sent + 1


async def test_an_append_on_a_bell_connection_sends_no_notify_of_its_own(
        bell_pool: AsyncConnectionPool, listener: Listener) -> None:
    """The pool's connections tell the trigger the bell will notify; a writer that
    does not ring it (a wiring mistake) leaves the relay to its poll: this is what
    proves no NOTIFY, and so no database-wide lock, is taken by the append."""
    writer = Writer(bell_pool, StateCache(100))
    office = Office()
    definition = await office.setup(writer)
    workflow = await office.workflow(writer, definition)
    assert await listener.outbox_has(workflow) == 1
    assert not await listener.next(QUIET_S)


async def test_every_other_writer_still_notifies_inside_its_append(
        settings: Settings, listener: Listener) -> None:
    """The saga, the relay's reconcile and operators' tools append without a bell."""
    async with AsyncConnectionPool(command_url(settings), min_size=1, max_size=2,
                                   kwargs={"autocommit": True}) as pool:
        writer = Writer(pool, StateCache(100))
        office = Office()
        definition = await office.setup(writer)
        await listener.drain()
        await office.workflow(writer, definition)
        assert await listener.next(5.0)


async def test_concurrent_commits_share_notifies_and_the_last_is_always_announced(
        bell_pool: AsyncConnectionPool, bell: OutboxBell, listener: Listener) -> None:
    writer = Writer(bell_pool, StateCache(100), bell)
    office = Office()
    definition = await office.setup(writer)
    workflows = [await office.workflow(writer, definition) for _ in range(20)]
    await listener.drain()
    sent = bell.sent
    comment = domain.AddComment("同時")
    await asyncio.gather(*(handlers.on_workflow(writer, office.ctx(office.initiator), w, comment)
                           for w in workflows))
    # 20 commits, each followed by a NOTIFY sent after it; never more than one each.
    assert await listener.next(5.0)
    await listener.drain()
    assert 1 <= bell.sent - sent <= 20


async def test_a_connection_found_dead_is_replaced_and_the_commit_still_announced(
        bell_pool: AsyncConnectionPool, bell: OutboxBell, listener: Listener,
        settings: Settings) -> None:
    writer = Writer(bell_pool, StateCache(100), bell)
    office = Office()
    definition = await office.setup(writer)
    await listener.drain()
    assert bell._conn is not None
    dead = bell._conn.info.backend_pid
    async with await psycopg.AsyncConnection.connect(libpq_url(settings.database_url or ""),
                                                     autocommit=True) as admin:
        await admin.execute("SELECT pg_terminate_backend(%s)", (dead,))
    await office.workflow(writer, definition)  # this ring meets the dead connection
    assert await listener.next(5.0)
    assert bell._conn is not None and bell._conn.info.backend_pid != dead


async def test_closing_sends_the_notify_still_owed(
        bell_pool: AsyncConnectionPool, listener: Listener, settings: Settings) -> None:
    bell = OutboxBell(command_url(settings))
    writer = Writer(bell_pool, StateCache(100), bell)
    office = Office()
    definition = await office.setup(Writer(bell_pool, StateCache(100)))
    await listener.drain()
    await office.workflow(writer, definition)
    await bell.close()  # before the bell's task has had a turn
    assert await listener.next(5.0)

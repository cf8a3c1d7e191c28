"""Waking the relay after an append commits, not inside its transaction (ADR 0014).

A NOTIFY queued inside the appending transaction holds a database-wide lock from
the start of its commit until the commit is flushed, so concurrent commands
commit one after another instead of in a group. The command API's connections
therefore tell the outbox trigger that they wake the relay themselves
(`configure`), and `execute` rings this bell after each append commits: one
NOTIFY from a connection of the bell's own, in a transaction with nothing to
flush, for however many appends committed while the previous one was on its
way or within `MIN_GAP_S` of it (a relay woken that recently is still reading).
Every commit is followed by a NOTIFY sent after it.

A ring that fails costs latency, never an event: the rows are in the outbox, and
the relay polls every `relay_poll_interval_s` as well."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import psycopg
from prometheus_client import Counter

from contract import OUTBOX_NOTIFY_CHANNEL

log = logging.getLogger("ringiflow.commands")

SETTING = "ringiflow.outbox_wakeup"  # read by event_store.notify_outbox() (migration 0011)
MIN_GAP_S = 0.002  # the first commit after a quiet spell is announced at once

WAKEUPS = Counter("ringiflow_command_outbox_wakeups_total",
                  "NOTIFYs sent to the relay after appends committed (one covers many)")


class OutboxBell:
    def __init__(self, url: str) -> None:
        self.url = url
        self.sent = 0
        self._sent_at = -MIN_GAP_S
        self._rung = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection | None = None

    async def configure(self, conn: psycopg.AsyncConnection) -> None:
        """The pool's `configure` hook: this connection's appends leave the NOTIFY to
        the bell. Only for pools whose writers ring it."""
        await conn.execute("SELECT set_config(%s, 'after_commit', false)", (SETTING,))

    def ring(self) -> None:
        """Called once an append has committed; returns at once."""
        self._rung.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self._rung.wait()
            if (gap := self._sent_at + MIN_GAP_S - time.monotonic()) > 0:
                await asyncio.sleep(gap)
            # Cleared before sending: a commit that lands during the send rings again.
            self._rung.clear()
            try:
                await self._notify()
            except psycopg.Error:
                await self._disconnect()  # found dead (a restart, an idle timeout): once more
                try:
                    await self._notify()
                except psycopg.Error as exc:
                    log.warning("could not wake the relay after a commit (%s); it finds the "
                                "rows on its next poll", exc)
                    await self._disconnect()

    async def _notify(self) -> None:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        await self._conn.execute("SELECT pg_notify(%s, '')", (OUTBOX_NOTIFY_CHANNEL,))
        self._sent_at = time.monotonic()
        self.sent += 1
        WAKEUPS.inc()

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()

    async def close(self) -> None:
        """Stop, sending the NOTIFY still owed to the last commits first."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._rung.is_set():
            with contextlib.suppress(psycopg.Error):
                await self._notify()
        await self._disconnect()

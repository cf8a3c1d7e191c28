"""Group commit: the appends of concurrent commands in one transaction (ADR 0018).

A command whose append finds a transaction free writes it, on its own connection,
together with every append that queued while the process's other transactions were
in flight (up to `max_batch`); the others wait for their result or for a
transaction to free up, whichever comes first. Before it writes, it lets the
commands already runnable reach the queue (one turn of the event loop): requests
that arrived together are one transaction, not a lone first one and the rest after
it. Nothing waits on a timer: one command alone is appended as before
(`store.append`), and batches form only from commands that would have queued for
the database anyway.

Each append keeps its own outcome (ADR 0013, 0016): a refusal undoes that append
only. An error of the transaction itself (the connection lost) reaches every
command of the batch, as it would have reached each one alone."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram
from psycopg import AsyncConnection, OperationalError
from psycopg.errors import DeadlockDetected

from commands import store

# Transactions a process keeps in flight at once: a batch forms while they are busy.
# One beat two and four (wrk, c=32 over 2 processes on 2 cores: 1,484-1,519 against
# 1,374-1,428 and 1,256-1,321 creates/s, p99 38 against 45 and 62 ms): the process
# is one core, and larger batches cost it less per command.
IN_FLIGHT = 1
# A batch whose appends wait on each other (two batches writing two streams in
# opposite orders) is broken by PostgreSQL's deadlock detector, which undoes one
# append; it is sent again this many times before the command sees the error.
DEADLOCK_RETRIES = 3

BATCH_SIZE = Histogram("ringiflow_command_group_commit_appends",
                       "Commands whose appends one transaction wrote (ADR 0018)",
                       buckets=(1, 2, 4, 8, 16, 32, 60))
DEADLOCKS = Counter("ringiflow_command_group_commit_deadlocks_total",
                    "Appends PostgreSQL undid to break a deadlock between batches, sent again")


@dataclass
class _Pending:
    append: store.Append
    outcome: asyncio.Future[store.Appended] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupCommit:
    """One per process (per event loop)."""

    def __init__(self, max_batch: int, in_flight: int = IN_FLIGHT) -> None:
        # PostgreSQL tracks 64 subtransactions per transaction before it slows every
        # snapshot; each append in a batch is one.
        if not 1 <= max_batch <= 60:
            raise ValueError(f"max_batch must be 1..60, not {max_batch}")
        self.max_batch, self.in_flight = max_batch, in_flight
        self.queued: list[_Pending] = []
        self.flushing = 0
        self.freed: asyncio.Future[None] | None = None  # resolved when a flush ends

    async def append(self, conn: AsyncConnection, append: store.Append) -> store.Appended:
        """`store.append`, possibly in one transaction with other commands' appends."""
        mine = _Pending(append)
        self.queued.append(mine)
        try:
            while not mine.outcome.done():
                if self.flushing < self.in_flight:
                    await asyncio.sleep(0)  # one turn: the commands runnable now join
                    if self.flushing < self.in_flight and not mine.outcome.done():
                        await self._flush(conn)
                    continue
                if self.freed is None or self.freed.done():
                    self.freed = asyncio.get_running_loop().create_future()
                await asyncio.wait((mine.outcome, self.freed),
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            if mine in self.queued:  # cancelled while queued: never sent
                self.queued.remove(mine)
            # Marked as read: whoever raised here saw the error itself, and a batch that
            # outlives a cancelled command sets an outcome nobody reads.
            if mine.outcome.done():
                _seen(mine.outcome)
            else:
                mine.outcome.add_done_callback(_seen)
        return mine.outcome.result()

    async def _flush(self, conn: AsyncConnection) -> None:
        batch, self.queued = self.queued[:self.max_batch], self.queued[self.max_batch:]
        BATCH_SIZE.observe(len(batch))
        self.flushing += 1
        try:
            outcomes = await write(conn, [p.append for p in batch])
        except BaseException as exc:
            error = exc if isinstance(exc, Exception) else OperationalError(
                "the transaction holding this command's append was interrupted; its "
                "outcome is unknown: retry the command with the same Idempotency-Key")
            for pending in batch:
                if not pending.outcome.done():
                    pending.outcome.set_exception(error)
            raise
        finally:
            self.flushing -= 1
            if self.freed is not None and not self.freed.done():
                self.freed.set_result(None)
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.outcome.done():
                continue
            if isinstance(outcome, Exception):
                pending.outcome.set_exception(outcome)
            else:
                pending.outcome.set_result(outcome)


def _seen(outcome: asyncio.Future[store.Appended]) -> None:
    outcome.exception()  # marks it retrieved: asyncio logs an unread error otherwise


async def write(conn: AsyncConnection,
                appends: list[store.Append]) -> list[store.Appended | Exception]:
    """These appends in one transaction: each one's outcome, or the refusal or error
    that undid it; one undone by a deadlock is sent again."""
    if len(appends) == 1:
        try:
            return [await store.append(conn, appends[0])]
        except (store.VersionConflict, store.IdempotencyKeyTaken, store.ReadsMoved) as refusal:
            return [refusal]
    # Streams in one order in every batch: two batches never wait on each other in a
    # cycle over the streams they append to.
    order = sorted(range(len(appends)),
                   key=lambda i: (appends[i].tenant_id, appends[i].aggregate_id))
    outcomes: dict[int, store.Appended | Exception] = {}
    todo = order
    for attempt in range(DEADLOCK_RETRIES + 1):
        written = await store.append_batch(conn, [appends[i] for i in todo])
        for i, outcome in zip(todo, written, strict=True):
            outcomes[i] = outcome
        todo = [i for i, outcome in zip(todo, written, strict=True)
                if isinstance(outcome, DeadlockDetected)]
        if not todo or attempt == DEADLOCK_RETRIES:
            break
        DEADLOCKS.inc(len(todo))
    return [outcomes[i] for i in range(len(appends))]

"""ADR 0018: concurrent commands' appends share one transaction, and each keeps the
outcome it would have had alone: a refusal undoes that append only, a race on one
stream is still decided append by append, and an interrupted batch strands nobody."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg_pool import AsyncConnectionPool

from commands import domain, handlers, store
from commands.cache import StateCache
from commands.group_commit import GroupCommit, write
from commands.service import VersionConflict, Writer
from infra.settings import Settings, libpq_url
from tests.events import comment_envelope
from tests.integration.test_state_cache import Office, versions


def comment(tenant: UUID, stream: UUID, head: int, **kw: Any) -> store.Append:
    return store.append_of(tenant, "workflow", stream, head,
                           [comment_envelope(tenant, stream, head + 1)], **kw)


async def rows(settings: Settings, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(libpq_url(settings.database_url or "")
                                                     ) as conn:
        return await (await conn.execute(sql, args)).fetchall()


def batches() -> tuple[float, float]:
    """Transactions the group commit wrote, and the appends they held."""
    get = REGISTRY.get_sample_value
    return (get("ringiflow_command_group_commit_appends_count") or 0,
            get("ringiflow_command_group_commit_appends_sum") or 0)


async def test_each_append_of_a_batch_keeps_its_own_outcome(
        command_pool: AsyncConnectionPool, settings: Settings) -> None:
    tenant, other_tenant = uuid4(), uuid4()
    s1, s2, s3, s4, s5, s6 = (uuid4() for _ in range(6))
    key = {"key": f"k-{uuid4()}", "request_hash": "h", "status_code": 201,
           "response": {"aggregate_id": str(s2)}}
    garbage = store.Append(tenant, "workflow", s5, 0,
                           store.OutboxItems(comment(tenant, s5, 0).items.targets,
                                             [b"not an envelope"]))
    async with command_pool.connection() as conn:
        outcomes = await store.append_batch(conn, [
            comment(tenant, s1, 0),
            comment(tenant, s1, 0),  # the same head again: s1 moved on under it
            comment(tenant, s2, 0, idempotency=key),
            comment(tenant, s3, 0, idempotency={**key, "response": {}}),  # the key is taken
            comment(tenant, s4, 0, reads={s1: 0}),  # s1 is at 1 by now
            garbage,
            comment(other_tenant, s6, 0),
        ])
    first, moved_on, keyed, key_taken, reads_moved, broken, other = outcomes
    assert isinstance(first, int) and isinstance(keyed, int) and isinstance(other, int)
    assert moved_on == [domain.DomainEvent("CommentAdded", {"body": "v1", "filler": ""})]
    assert isinstance(key_taken, store.IdempotencyKeyTaken)
    assert isinstance(reads_moved, store.ReadsMoved) and str(s1) in str(reads_moved)
    assert isinstance(broken, psycopg.DataError), broken
    written = await rows(settings, "SELECT aggregate_id, tenant_id, version FROM "
                         "event_store.events WHERE aggregate_id = ANY(%s)",
                         [s1, s2, s3, s4, s5, s6])
    assert sorted(written) == sorted([(s1, tenant, 1), (s2, tenant, 1), (s6, other_tenant, 1)])
    outbox = await rows(settings, "SELECT aggregate_id FROM event_store.outbox "
                        "WHERE aggregate_id = ANY(%s)", [s1, s2, s3, s4, s5, s6])
    assert sorted(outbox) == sorted([(s1,), (s2,), (s6,)])
    [(response,)] = await rows(settings, "SELECT response FROM event_store.idempotency_keys "
                               "WHERE idempotency_key = %s", key["key"])
    assert response["aggregate_id"] == str(s2)  # the first command's, not the refused one's


async def test_concurrent_commands_share_transactions_and_all_land(
        command_pool: AsyncConnectionPool, settings: Settings) -> None:
    writer = Writer(command_pool, StateCache(100), None, StateCache(100), GroupCommit(32))
    office = Office()
    definition = await office.setup(writer)
    transactions, appends = batches()
    workflows = await asyncio.gather(*(office.workflow(writer, definition) for _ in range(40)))
    transactions, appends = batches()[0] - transactions, batches()[1] - appends
    assert appends == 40
    assert transactions < 40, "no two commands shared a transaction"
    for workflow in workflows:
        assert await versions(settings, workflow) == [(1, "WorkflowCreated")]


async def test_commands_that_arrive_together_are_one_transaction(
        command_pool: AsyncConnectionPool) -> None:
    """The first to find no transaction in flight lets the commands already runnable
    reach the queue before it writes (one turn of the event loop, no timer): not a
    batch of one, then the rest."""
    group, tenant = GroupCommit(32), uuid4()
    async with command_pool.connection() as conn:  # only the one writing uses it
        transactions, appends = batches()
        outcomes = await asyncio.gather(*(group.append(conn, comment(tenant, uuid4(), 0))
                                          for _ in range(8)))
        transactions, appends = batches()[0] - transactions, batches()[1] - appends
    assert all(isinstance(outcome, int) for outcome in outcomes)
    assert (transactions, appends) == (1, 8)


async def test_a_race_on_one_stream_inside_batches_never_forks_it(
        command_pool: AsyncConnectionPool, settings: Settings) -> None:
    """Twenty comments at once on one workflow: each that succeeds holds its own version,
    one after another, and each that fails is a version conflict (as without batches);
    with one expected version, exactly one lands."""
    writer = Writer(command_pool, StateCache(100), None, StateCache(100), GroupCommit(32))
    office = Office()
    workflow = await office.workflow(writer, await office.setup(writer))

    async def comment_on(n: int, expected: int | None = None) -> object:
        return await handlers.on_workflow(
            writer, office.ctx(office.initiator, expected_version=expected), workflow,
            domain.AddComment(f"c{n}"))

    results = await asyncio.gather(*(comment_on(n) for n in range(20)), return_exceptions=True)
    landed = [r for r in results if not isinstance(r, Exception)]
    assert all(isinstance(r, VersionConflict) for r in results if isinstance(r, Exception))
    assert len(landed) >= 2, "batches serialised the race into one winner"
    head = 1 + len(landed)
    assert [v for v, _ in await versions(settings, workflow)] == list(range(1, head + 1))
    assert sorted(r.body["version"] for r in landed) == list(range(2, head + 1))

    results = await asyncio.gather(*(comment_on(n, expected=head) for n in range(10)),
                                   return_exceptions=True)
    assert sum(not isinstance(r, Exception) for r in results) == 1
    assert all(isinstance(r, VersionConflict) for r in results if isinstance(r, Exception))
    assert len(await versions(settings, workflow)) == head + 1


async def test_an_interrupted_batch_fails_its_commands_and_strands_none_behind_it(
        command_pool: AsyncConnectionPool, settings: Settings) -> None:
    """The leader of a batch is cancelled while its transaction waits on a lock: the
    commands in that batch get an error at once (and nothing of them is written); the
    commands queued behind it are written by the next leader."""
    group, tenant = GroupCommit(32), uuid4()
    x, y = uuid4(), uuid4()
    url = libpq_url(settings.database_url or "")
    blockers = [await psycopg.AsyncConnection.connect(url) for _ in range(2)]
    try:
        for blocker, stream in zip(blockers, (x, y), strict=True):  # uncommitted version 1s
            await blocker.execute("SELECT event_store.append_events(%s, %s, %b)",
                                  (tenant, *store.outbox_items([comment_envelope(tenant, stream,
                                                                                 1)])))

        async def append(a: store.Append) -> store.Appended:
            async with command_pool.connection() as conn:
                return await group.append(conn, a)

        first = asyncio.create_task(append(comment(tenant, x, 0)))  # waits on blockers[0]
        await asyncio.sleep(0.3)
        leader = asyncio.create_task(append(comment(tenant, y, 0)))  # will wait on blockers[1]
        riders = [uuid4(), uuid4()]
        in_batch = [asyncio.create_task(append(comment(tenant, s, 0))) for s in riders]
        await asyncio.sleep(0.3)
        await blockers[0].rollback()  # `first` lands; `leader` takes the queue with it
        assert isinstance(await asyncio.wait_for(first, 10), int)
        await asyncio.sleep(0.3)
        behind = [uuid4(), uuid4()]
        queued = [asyncio.create_task(append(comment(tenant, s, 0))) for s in behind]
        await asyncio.sleep(0.3)
        leader.cancel()
        for task in in_batch:
            with pytest.raises(psycopg.OperationalError, match="outcome is unknown"):
                await asyncio.wait_for(task, 10)
        for task in queued:
            assert isinstance(await asyncio.wait_for(task, 10), int)
        await blockers[1].rollback()
    finally:
        for blocker in blockers:
            await blocker.close()
    written = {a for (a,) in await rows(settings, "SELECT aggregate_id FROM event_store.events "
                                        "WHERE tenant_id = %s", tenant)}
    assert written == {x, *behind}


async def test_a_deadlock_between_two_batches_is_sent_again_and_reaches_no_command(
        command_pool: AsyncConnectionPool, settings: Settings) -> None:
    """Two batches (two processes) share stream x and idempotency key k, each taking one
    first: PostgreSQL breaks the cycle by undoing one append, which is sent again and
    ends as the refusal it would have had alone, never as a deadlock."""
    tenant = uuid4()
    a, x, b = sorted(uuid4() for _ in range(3))  # batches go in stream order: a, x, b
    k = {"key": f"k-{uuid4()}", "request_hash": "h", "status_code": 201, "response": {}}
    deadlocks = REGISTRY.get_sample_value("ringiflow_command_group_commit_deadlocks_total") or 0
    blocker = await psycopg.AsyncConnection.connect(libpq_url(settings.database_url or ""))
    try:
        # An uncommitted version 1 of a: batch one takes k, then waits here.
        await blocker.execute("SELECT event_store.append_events(%s, %s, %b)",
                              (tenant, *store.outbox_items([comment_envelope(tenant, a, 1)])))

        async def batch(appends: list[store.Append]) -> list[store.Appended | Exception]:
            async with command_pool.connection() as conn:
                return await write(conn, appends)

        one = asyncio.create_task(batch([comment(tenant, a, 0, idempotency=k),
                                         comment(tenant, x, 0)]))
        await asyncio.sleep(0.5)
        two = asyncio.create_task(batch([comment(tenant, x, 0),  # takes x, waits for k
                                         comment(tenant, b, 0, idempotency=k)]))
        await asyncio.sleep(0.5)
        await blocker.rollback()  # batch one goes on to x: the cycle closes
        outcomes = await asyncio.wait_for(asyncio.gather(one, two), 30)
    finally:
        await blocker.close()
    assert REGISTRY.get_sample_value("ringiflow_command_group_commit_deadlocks_total") == (
        deadlocks + 1), "the batches did not deadlock: the test no longer tests the retry"
    (a_out, x_by_one), (x_by_two, b_out) = outcomes
    assert isinstance(a_out, int)
    assert isinstance(b_out, store.IdempotencyKeyTaken)  # k is a's
    assert isinstance(x_by_two, int)  # x is two's; one's append lost the race to it
    assert isinstance(x_by_one, store.VersionConflict) or x_by_one == [
        domain.DomainEvent("CommentAdded", {"body": "v1", "filler": ""})], x_by_one
    written = await rows(settings, "SELECT aggregate_id, version FROM event_store.events "
                         "WHERE tenant_id = %s", tenant)
    assert sorted(written) == sorted([(a, 1), (x, 1)])


async def test_a_batch_whose_session_is_killed_fails_whole_and_its_retries_land_once(
        command_pool: AsyncConnectionPool, settings: Settings) -> None:
    """PostgreSQL's session dies under a batch in flight: every command of it gets the
    error and nothing of the batch is written; each, retried with its Idempotency-Key,
    lands exactly once."""
    writer = Writer(command_pool, StateCache(100), None, StateCache(100), GroupCommit(32))
    office = Office()
    definition = await office.setup(writer)
    first, *batched = [await office.workflow(writer, definition) for _ in range(4)]
    keys = {w: f"comment-{uuid4()}" for w in batched}

    async def comment_on(workflow: UUID, key: str | None = None) -> object:
        ctx = dataclasses.replace(office.ctx(office.initiator), idempotency_key=key,
                                  request_fingerprint=f"comment {key}")
        return await handlers.on_workflow(writer, ctx, workflow, domain.AddComment("再送"))

    url = libpq_url(settings.database_url or "")
    blockers = [await psycopg.AsyncConnection.connect(url) for _ in range(2)]
    try:
        for blocker, workflow in zip(blockers, (first, batched[0]), strict=True):
            await blocker.execute("SELECT event_store.append_events(%s, %s, %b)", (
                office.tenant, *store.outbox_items([comment_envelope(office.tenant, workflow,
                                                                     2)])))
        alone = asyncio.create_task(comment_on(first))  # in flight, waiting on blockers[0]
        await asyncio.sleep(0.3)
        in_batch = [asyncio.create_task(comment_on(w, keys[w])) for w in batched]
        await asyncio.sleep(0.3)
        await blockers[0].rollback()  # `alone` lands; the three go as one batch
        await asyncio.wait_for(alone, 10)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
            for _ in range(100):  # the batch, waiting on blockers[1]
                killed = await (await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE query LIKE '%%append_batch%%' AND wait_event_type = 'Lock'")
                                ).fetchall()
                if killed:
                    break
                await asyncio.sleep(0.05)
        assert killed, "the batch never waited on the lock"
        for task in in_batch:
            with pytest.raises(psycopg.OperationalError):
                await asyncio.wait_for(task, 10)
        await blockers[1].rollback()
    finally:
        for blocker in blockers:
            await blocker.close()
    for workflow in batched:
        assert [v for v, _ in await versions(settings, workflow)] == [1]  # none written
    retried = await asyncio.gather(*(comment_on(w, keys[w]) for w in batched))
    assert [r.replayed for r in retried] == [False] * 3  # nothing had committed to replay
    again = await asyncio.gather(*(comment_on(w, keys[w]) for w in batched))
    assert [r.replayed for r in again] == [True] * 3
    for workflow in batched:
        assert await versions(settings, workflow) == [(1, "WorkflowCreated"),
                                                      (2, "CommentAdded")]

"""ADR 0016: what a command reads of other aggregates comes from the process's cache
when it holds it, and the append writes only if each snapshot read is still
current. Two writers with caches of their own stand for two processes."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg_pool import AsyncConnectionPool

from commands import domain, handlers, store
from commands.cache import StateCache
from commands.reads import Reads
from commands.service import ReadsChanged, Writer, envelopes_for, execute
from contract import utcnow
from infra.settings import Settings, libpq_url
from tests.integration.test_state_cache import Office


def writer_of(command_pool: AsyncConnectionPool) -> Writer:
    return Writer(command_pool, StateCache(100), None, StateCache(100))


def reads_from(source: str) -> float:
    return REGISTRY.get_sample_value("ringiflow_command_reads_total", {"source": source}) or 0


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[UUID]:
    """The definitions read from the database, in order."""
    seen: list[UUID] = []
    read = store.definition_with_assignees

    async def counted(conn: psycopg.AsyncConnection, tenant: UUID,
                      definition: UUID) -> Any:
        seen.append(definition)
        return await read(conn, tenant, definition)

    monkeypatch.setattr(store, "definition_with_assignees", counted)
    return seen


async def created_steps(settings: Settings, workflow: UUID) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(libpq_url(settings.database_url or "")
                                                     ) as conn:
        cur = await conn.execute("SELECT payload FROM event_store.events "
                                 "WHERE aggregate_id = %s ORDER BY version", (workflow,))
        payloads = [payload for (payload,) in await cur.fetchall()]
    assert len(payloads) == 1, "one WorkflowCreated, nothing from a refused attempt"
    return payloads[0]["steps"]


async def test_the_second_workflow_of_a_definition_needs_no_read(
        command_pool: AsyncConnectionPool, lookups: list[UUID]) -> None:
    writer, office = writer_of(command_pool), Office()
    definition = await office.setup(writer)
    before = reads_from("cached")
    await office.workflow(writer, definition)
    await office.workflow(writer, definition)
    assert lookups == [definition]  # the first read it; the second used the cache
    assert reads_from("cached") - before == 3  # the definition and its two assignees


async def test_a_rename_elsewhere_reaches_the_next_workflow_though_the_name_was_cached(
        command_pool: AsyncConnectionPool, settings: Settings, lookups: list[UUID]) -> None:
    """a holds the approver's old name; b renamed them. a's next workflow carries
    the new name: the append refused the stale read and nothing of it was written."""
    a, b, office = writer_of(command_pool), writer_of(command_pool), Office()
    definition = await office.setup(a)
    first = await office.workflow(a, definition)
    assert [s["assignee_name"] for s in await created_steps(settings, first)] == [
        "利用者", "利用者"]
    await handlers.rename_user(b, office.ctx(office.a2), office.a2, "新部長")
    second = await office.workflow(a, definition)
    assert [s["assignee_name"] for s in await created_steps(settings, second)] == [
        "利用者", "新部長"]
    assert lookups == [definition, definition]  # the refused attempt read again
    third = await office.workflow(a, definition)  # and the cache holds the new name
    assert [s["assignee_name"] for s in await created_steps(settings, third)] == [
        "利用者", "新部長"]
    assert lookups == [definition, definition]


async def test_a_refusal_decided_on_a_cached_snapshot_is_asked_again(
        command_pool: AsyncConnectionPool) -> None:
    """A command refused on what the cache holds is built again from fresh reads,
    and lands if the truth allows it."""
    a, b, office = writer_of(command_pool), writer_of(command_pool), Office()
    definition = await office.setup(a)
    await handlers.rename_user(a, office.ctx(office.a1), office.a1, "休職中")

    async def assign_unless_away(reads: Reads) -> domain.Command:
        name = (await handlers.user_names(reads, {office.a1}))[office.a1]
        if name == "休職中":
            raise domain.InvalidCommand(f"{name}: cannot take a step")
        return domain.AddComment(f"{name}に依頼")

    workflow = await office.workflow(a, definition)  # a's cache now holds 休職中
    with pytest.raises(domain.InvalidCommand):  # the truth refuses it: no fresh read helps
        await execute(a, office.ctx(office.initiator), "workflow", workflow,
                      assign_unless_away)
    await handlers.rename_user(b, office.ctx(office.a1), office.a1, "復職")
    landed = await execute(a, office.ctx(office.initiator), "workflow", workflow,
                           assign_unless_away)  # a's cache still says 休職中
    assert landed.body["version"] == 2


async def test_the_append_refuses_a_read_that_moved_and_writes_nothing(
        command_pool: AsyncConnectionPool) -> None:
    writer, office = writer_of(command_pool), Office()
    await office.setup(writer)
    other_tenant_user = uuid4()
    stranger = Office()
    await handlers.register_user(writer, stranger.ctx(stranger.admin, ("admin",)),
                                 other_tenant_user, "他社", "x@example.jp")
    workflow = uuid4()
    state = domain.initial_state("workflow", workflow)
    command = domain.CreateWorkflow(uuid4(), "d", (domain.ResolvedStep("s", office.a1, "a"),),
                                    "t")
    ctx = office.ctx(office.initiator)
    events = domain.decide(command, state, domain.Actor(office.initiator, "t", ("user",)),
                           utcnow())
    envelopes, _ = envelopes_for(state, events, ctx)
    async with command_pool.connection() as conn:
        for reads in ({office.a1: 2},  # registered at version 1
                      {office.a1: 1, uuid4(): 1},  # one that does not exist
                      {other_tenant_user: 1}):  # another tenant's: not there for this one
            with pytest.raises(store.ReadsMoved, match="was read at version"):
                await store.append(conn, store.append_of(office.tenant, "workflow", workflow,
                                                         0, envelopes, None, reads))
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="versions"):
            await conn.execute(
                "SELECT * FROM event_store.append_at(%s, 'workflow', %s, 0, %s, %b, NULL, "
                "%s::uuid[], %s::integer[])",
                (office.tenant, workflow, *store.outbox_items(envelopes), [office.a1], [1, 2]))
        assert await store.current_version(conn, office.tenant, workflow) == 0
        assert await store.append(conn, store.append_of(office.tenant, "workflow", workflow, 0,
                                                        envelopes, None, {office.a1: 1})) > 0


async def test_reads_that_keep_moving_refuse_the_command_after_a_few_fresh_tries(
        command_pool: AsyncConnectionPool) -> None:
    """Every attempt renames the approver just before appending: the command gives up
    with a conflict the caller can retry, and writes nothing."""
    a, b, office = writer_of(command_pool), writer_of(command_pool), Office()
    workflow = await office.workflow(a, await office.setup(a))
    renames = 0

    async def name_then_race(reads: Reads) -> domain.Command:
        nonlocal renames
        name = (await handlers.user_names(reads, {office.a1}))[office.a1]
        renames += 1
        await handlers.rename_user(b, office.ctx(office.a1), office.a1, f"改名{renames}")
        return domain.AddComment(f"{name}へ")

    with pytest.raises(ReadsChanged, match="kept changing"):
        await execute(a, office.ctx(office.initiator), "workflow", workflow, name_then_race)
    assert renames == 6  # the first attempt and five fresh ones
    async with command_pool.connection() as conn:
        assert await store.current_version(conn, office.tenant, workflow) == 1

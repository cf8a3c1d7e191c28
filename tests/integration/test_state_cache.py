"""ADR 0013: each command API process keeps the aggregates it wrote, and a copy
gone stale never decides what is written. Two writers with caches of their own
over one database stand for two processes behind one port."""

from __future__ import annotations

from uuid import UUID, uuid4

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg_pool import AsyncConnectionPool

from commands import domain, handlers
from commands.cache import StateCache
from commands.domain.workflow.decide import step_id_of
from commands.service import CommandContext, VersionConflict, Writer
from contract import new_trace_id
from infra.auth import Principal
from infra.settings import Settings, libpq_url


class Office:
    """One tenant: an admin, an initiator, two approvers and a two-step definition."""

    def __init__(self) -> None:
        self.tenant = uuid4()
        self.admin, self.initiator, self.a1, self.a2 = (uuid4() for _ in range(4))

    def ctx(self, user: UUID, roles: tuple[str, ...] = ("user",),
            expected_version: int | None = None) -> CommandContext:
        return CommandContext(Principal(self.tenant, user, "テスト", roles), uuid4(), uuid4(),
                              new_trace_id(), None, expected_version, "")

    async def setup(self, writer: Writer) -> UUID:
        admin = self.ctx(self.admin, ("admin",))
        for user in (self.initiator, self.a1, self.a2):
            await handlers.register_user(writer, admin, user, "利用者", "u@example.jp")
        created = await handlers.create_definition(
            writer, admin, "稟議", [("課長", self.a1), ("部長", self.a2)], None)
        return UUID(created.body["aggregate_id"])

    async def workflow(self, writer: Writer, definition: UUID) -> UUID:
        created = await handlers.create_workflow(writer, self.ctx(self.initiator), definition,
                                                 "備品購入", None, "medium", None, ())
        return UUID(created.body["aggregate_id"])


def commands_by(source: str) -> float:
    return REGISTRY.get_sample_value("ringiflow_command_state_total", {"source": source}) or 0


async def versions(settings: Settings, workflow: UUID) -> list[tuple[int, str]]:
    async with await psycopg.AsyncConnection.connect(libpq_url(settings.database_url or "")
                                                     ) as conn:
        cur = await conn.execute("SELECT version, event_type FROM event_store.events "
                                 "WHERE aggregate_id = %s ORDER BY version", (workflow,))
        return [(v, t) for v, t in await cur.fetchall()]


async def test_a_stale_copy_is_brought_up_to_date_and_the_command_still_lands(
        command_pool: AsyncConnectionPool, settings: Settings) -> None:
    a, b = Writer(command_pool, StateCache(100)), Writer(command_pool, StateCache(100))
    office = Office()
    workflow = await office.workflow(a, await office.setup(a))
    comment = domain.AddComment("一")
    await handlers.on_workflow(a, office.ctx(office.initiator), workflow, comment)  # a: v2
    await handlers.on_workflow(b, office.ctx(office.initiator), workflow, comment)  # b: v3
    # a's copy says v2; the stream is at v3.
    before = {source: commands_by(source) for source in ("cached", "stale")}
    outcome = await handlers.on_workflow(a, office.ctx(office.initiator), workflow, comment)
    assert outcome.body["version"] == 4
    await handlers.on_workflow(a, office.ctx(office.initiator), workflow, comment)  # current
    assert commands_by("stale") - before["stale"] == 1  # what /metrics tells operators
    assert commands_by("cached") - before["cached"] == 1
    assert [v for v, _ in await versions(settings, workflow)] == [1, 2, 3, 4, 5]
    assert a.cache is not None
    cached = a.cache.get((office.tenant, "workflow", workflow))
    assert cached is not None and cached.version == 5


async def test_a_stale_copy_that_would_refuse_does_not(
        command_pool: AsyncConnectionPool, settings: Settings) -> None:
    """a still holds the draft; b submitted it. Approving through a is right, not a
    refusal for a workflow that 'was never submitted'."""
    a, b = Writer(command_pool, StateCache(100)), Writer(command_pool, StateCache(100))
    office = Office()
    workflow = await office.workflow(a, await office.setup(a))
    await handlers.on_workflow(b, office.ctx(office.initiator), workflow,
                               domain.SubmitWorkflow())
    approved = await handlers.on_workflow(a, office.ctx(office.a1), workflow,
                                          domain.ApproveStep(step_id_of(workflow, 1), None))
    assert approved.body["version"] == 5
    assert [t for _, t in await versions(settings, workflow)][-2:] == [
        "WorkflowStepCompleted", "WorkflowStepAssigned"]


async def test_a_stale_copy_that_would_accept_is_refused_by_the_truth(
        command_pool: AsyncConnectionPool, settings: Settings) -> None:
    """a still holds the draft; b cancelled it. A comment through a is refused as on a
    cancelled workflow, and nothing is written."""
    a, b = Writer(command_pool, StateCache(100)), Writer(command_pool, StateCache(100))
    office = Office()
    workflow = await office.workflow(a, await office.setup(a))
    await handlers.on_workflow(b, office.ctx(office.initiator), workflow,
                               domain.CancelWorkflow("不要"))
    before = await versions(settings, workflow)
    with pytest.raises(domain.InvalidState):
        await handlers.on_workflow(a, office.ctx(office.initiator), workflow,
                                   domain.AddComment("遅すぎる"))
    assert await versions(settings, workflow) == before


async def test_expected_version_is_checked_against_the_stream_not_the_copy(
        command_pool: AsyncConnectionPool, settings: Settings) -> None:
    a, b = Writer(command_pool, StateCache(100)), Writer(command_pool, StateCache(100))
    office = Office()
    workflow = await office.workflow(a, await office.setup(a))
    await handlers.on_workflow(b, office.ctx(office.initiator), workflow,
                               domain.AddComment("b"))  # v2; a's copy is at v1
    landed = await handlers.on_workflow(a, office.ctx(office.initiator, expected_version=2),
                                        workflow, domain.AddComment("a"))
    assert landed.body["version"] == 3
    with pytest.raises(VersionConflict) as refused:
        await handlers.on_workflow(b, office.ctx(office.initiator, expected_version=2),
                                   workflow, domain.AddComment("b again"))
    assert refused.value.extra["current_version"] == 3
    assert [v for v, _ in await versions(settings, workflow)] == [1, 2, 3]


async def test_one_id_in_two_tenants_never_shares_a_cached_state(
        command_pool: AsyncConnectionPool, settings: Settings) -> None:
    writer = Writer(command_pool, StateCache(100))
    first, second = Office(), Office()
    same_id = uuid4()
    for office, name in ((first, "一"), (second, "二")):
        await handlers.register_user(writer, office.ctx(office.admin, ("admin",)), same_id,
                                     name, "x@example.jp")
    renamed = await handlers.rename_user(writer, second.ctx(same_id), same_id, "二号")
    assert renamed.body["version"] == 2
    assert writer.cache is not None
    one = writer.cache.get((first.tenant, "user", same_id))
    two = writer.cache.get((second.tenant, "user", same_id))
    assert one is not None and two is not None
    assert (one.display_name, one.version) == ("一", 1)
    assert (two.display_name, two.version) == ("二号", 2)


def test_the_cache_keeps_the_most_recently_used_within_its_capacity() -> None:
    cache = StateCache(2)
    tenant = uuid4()
    keys = [(tenant, "workflow", uuid4()) for _ in range(3)]
    states = [domain.initial_state("workflow", key[2]) for key in keys]
    cache.put(keys[0], states[0])
    cache.put(keys[1], states[1])
    assert cache.get(keys[0]) is states[0]  # now the most recent
    cache.put(keys[2], states[2])
    assert cache.get(keys[1]) is None and len(cache) == 2
    off = StateCache(0)
    off.put(keys[0], states[0])
    assert off.get(keys[0]) is None

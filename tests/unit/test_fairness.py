"""Fair shares, honest waits woken by notification, and the JSON depth guard."""

from __future__ import annotations

import asyncio
import json
import time
from uuid import uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contract import (
    NOTIFY_PAYLOAD_MAX,
    AggregateType,
    ConsistencyToken,
    applied_payloads,
    parse_applied,
)
from infra.edge import json_depth_exceeds
from infra.problems import problem_of
from query_api.app import STATUSES
from query_api.consistency import TooManyWaits, Waits
from query_api.live import Refused, Shares

TOKEN = ConsistencyToken(AggregateType.WORKFLOW, uuid4(), 3)


def test_shares_cap_per_user_then_per_tenant_and_give_back() -> None:
    shares = Shares("sockets", per_user=2, per_tenant=3, total=10)
    with shares.hold("t", "u1"), shares.hold("t", "u1"):
        with pytest.raises(Refused, match="for this user"), shares.hold("t", "u1"):
            pass
        with shares.hold("t", "u2"):
            with pytest.raises(Refused, match="for this tenant"), shares.hold("t", "u3"):
                pass
            with shares.hold("other", "u1"):  # another tenant is not affected
                pass
    assert shares.held == 0 and not shares.users and not shares.tenants


async def test_only_the_version_a_waiter_wants_wakes_it_and_at_once() -> None:
    waits = Waits(per_user=4, per_tenant=8)
    tenant, user, version = uuid4(), uuid4(), [0]
    reads = [0]

    async def applied(_token: ConsistencyToken) -> int:
        reads[0] += 1
        return version[0]

    async def apply_later() -> None:
        await asyncio.sleep(0.2)
        # Other aggregates, an older version, the same aggregate in another store or
        # tenant: none of these is what the waiter waits for.
        for _ in range(50):
            waits.applied("postgres", str(tenant), uuid4(), 9)
            waits.applied("postgres", str(tenant), TOKEN.aggregate_id, 2)
            waits.applied("redis", str(tenant), TOKEN.aggregate_id, 3)
            waits.applied("postgres", str(uuid4()), TOKEN.aggregate_id, 3)
            await asyncio.sleep(0.002)
        before = reads[0]
        version[0] = 3
        waits.applied("postgres", str(tenant), TOKEN.aggregate_id, 3)
        return before

    started = time.monotonic()
    helper = asyncio.create_task(apply_later())
    # poll_s=30: without the notification the waiter would sleep far past 0.3 s
    result = await waits.wait(tenant, user, TOKEN, applied, 5000, "workflow_list", poll_s=30)
    unrelated_reads = await helper
    assert result.status == "reached"
    assert time.monotonic() - started < 1.0
    assert unrelated_reads < 10, f"{unrelated_reads} reads: woken by what it did not wait for"
    assert reads[0] == unrelated_reads, "announced as visible: it is not read again"
    assert not waits.waiting and not waits.redis_tenants  # nothing left behind


async def test_while_announcements_flow_a_wait_reads_once_and_polls_only_as_a_backup() -> None:
    """Hundreds of waits polling from 10 ms starved the query API's pool under load;
    while the store's announcements reach the process, a wait reads once, then
    polls once a second only in case its announcement is lost."""
    waits = Waits(per_user=4, per_tenant=8)
    waits.heard.add("postgres")
    reads, version = [0], [0]

    async def applied(_token: ConsistencyToken) -> int:
        reads[0] += 1
        return version[0]

    wait = asyncio.create_task(waits.wait(uuid4(), uuid4(), TOKEN, applied, 5000,
                                          "workflow_list"))
    await asyncio.sleep(0.5)
    assert reads[0] == 1, "polled although announcements were flowing"
    version[0] = 3  # visible, but its announcement was lost: the backup poll finds it
    result = await wait
    assert result.status == "reached" and 900 <= result.waited_ms < 1500
    assert reads[0] == 2


async def test_without_announcements_a_wait_polls_eagerly() -> None:
    waits = Waits(per_user=4, per_tenant=8)  # nothing heard: the listener is down
    version = [0]

    async def applied(_token: ConsistencyToken) -> int:
        return version[0]

    async def apply_unannounced() -> None:
        await asyncio.sleep(0.1)
        version[0] = 3

    helper = asyncio.create_task(apply_unannounced())
    result = await waits.wait(uuid4(), uuid4(), TOKEN, applied, 5000, "workflow_list")
    await helper
    assert result.status == "reached" and result.waited_ms < 400


def test_applied_notifications_fit_notify_and_keep_each_aggregates_newest_version() -> None:
    tenant = uuid4()
    many = [(tenant, uuid4(), n) for n in range(500)]
    one = many[0][1]
    payloads = applied_payloads("search", [*many, (tenant, one, 7), (tenant, one, 3)])
    assert len(payloads) > 1 and all(len(p.encode()) <= NOTIFY_PAYLOAD_MAX for p in payloads)
    parsed = [parse_applied(p) for p in payloads]
    assert {store for store, _ in parsed} == {"search"}
    seen = {(t, a): v for _, entries in parsed for t, a, v in entries}
    assert len(seen) == 500 and seen[(tenant, one)] == 7
    assert parse_applied("postgres;garbage,1:2:3")[1] == []


async def test_the_deadline_holds_even_when_a_read_hangs() -> None:
    waits = Waits(per_user=4, per_tenant=8)

    async def stuck(_token: ConsistencyToken) -> int:
        await asyncio.sleep(60)  # e.g. a pool with no free connection
        return 0

    started = time.monotonic()
    result = await waits.wait(uuid4(), uuid4(), TOKEN, stuck, 1500, "workflow_list")
    assert result.status == "timeout"
    assert 1.4 < time.monotonic() - started < 2.0


async def test_too_many_waits_of_one_user_are_429() -> None:
    waits = Waits(per_user=1, per_tenant=8)
    tenant, user = uuid4(), uuid4()

    async def never(_token: ConsistencyToken) -> int:
        return 0

    first = asyncio.create_task(waits.wait(tenant, user, TOKEN, never, 500, "workflow_list"))
    await asyncio.sleep(0.05)
    with pytest.raises(TooManyWaits) as refused:
        await waits.wait(tenant, user, TOKEN, never, 500, "workflow_list")
    problem = problem_of(refused.value, STATUSES)  # as the query API answers it
    assert problem is not None and problem.status == 429 and "limit 1" in problem.detail
    assert problem.headers == {"Retry-After": "1"}
    assert (await waits.wait(tenant, uuid4(), TOKEN, never, 0, "workflow_list")).status == "timeout"
    assert (await first).status == "timeout"


def depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


JSON = st.recursive(st.none() | st.integers() | st.text(alphabet='[]{}"\\ax', max_size=8),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(alphabet='[]{}"\\k', max_size=4), inner,
                                      max_size=3), max_leaves=30)


@settings(max_examples=300, derandomize=True)
@given(value=JSON, limit=st.integers(1, 8))
def test_the_depth_guard_agrees_with_a_parser(value: object, limit: int) -> None:
    body = json.dumps(value).encode()
    assert json_depth_exceeds(body, limit) == (depth(value) > limit)


@settings(max_examples=300, derandomize=True)
@given(raw=st.text(max_size=300))
def test_any_string_decodes_to_a_token_or_a_value_error(raw: str) -> None:
    try:
        token = ConsistencyToken.decode(raw)
    except ValueError as exc:
        assert "consistency token" in str(exc)
    else:
        assert 1 <= token.version <= ConsistencyToken.MAX_VERSION

"""Read-your-writes across hops: a query that brings a command's
consistency token waits, bounded, until the read model it reads has applied
that version of that aggregate, and says whether it got there."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import psycopg
from opentelemetry import trace
from opentelemetry.trace import Link
from prometheus_client import Histogram

from contract import APPLIED_NOTIFY_CHANNEL, ConsistencyToken, parse_applied
from infra import tracing
from infra.problems import AppError
from infra.retry import Backoff
from infra.telemetry import HOP_BUCKETS
from query_api.live import Refused, Shares

log = logging.getLogger("ringiflow.query.consistency")
DEFAULT_WAIT_MS = 2000
MAX_WAIT_MS = 10_000
FIRST_READ_S = 1.0
# Polls back announcements up. While a store's announcements arrive (its listener is
# connected) a wait polls only every `poll_s`: eager polls of hundreds of waits were
# most of the query API's reads under load and starved its pool. Without them, it
# polls from EAGER_POLL_S up.
EAGER_POLL_S = 0.01
WAITED = Histogram("ringiflow_consistency_wait_seconds",
                   "A read's wait for its consistency token, by read model and outcome",
                   ["read_model", "outcome"], buckets=HOP_BUCKETS)


class InvalidConsistencyToken(AppError):
    code = "invalid_consistency_token"


class TooManyWaits(AppError):
    """The caller (or its tenant) holds as many consistency waits as it may."""

    code = "too_many_waits"


@dataclass(frozen=True)
class Consistency:
    status: str  # "none" (no token), "reached", "timeout"
    waited_ms: int
    token: ConsistencyToken | None = None

    def headers(self) -> dict[str, str]:
        if self.token is None:
            return {}
        return {"X-Consistency": self.status, "X-Consistency-Waited-Ms": str(self.waited_ms)}


def parse_token(header: str | None, query: str | None) -> ConsistencyToken | None:
    """The header's token, else the query's; a malformed one is refused even when the
    other is sent too (a bad parameter is never silently ignored)."""
    try:
        tokens = [ConsistencyToken.decode(raw) for raw in (header, query) if raw]
    except ValueError as exc:
        raise InvalidConsistencyToken(str(exc)) from None
    return tokens[0] if tokens else None


# Which store each waited-on read model lives in: the name its projector announces.
SOURCES = {"workflow_list": "postgres", "my_tasks": "postgres", "workflow_detail": "redis",
           "search": "search"}
# The stores that announce over PostgreSQL NOTIFY (the rest over Redis pub/sub).
NOTIFIED = frozenset(SOURCES.values()) - {"redis"}


@dataclass(eq=False)
class Waiter:
    """One wait for `version`; `reached` once a store announced it visible."""

    version: int
    woken: asyncio.Event = field(default_factory=asyncio.Event)
    reached: bool = False


class Waits:
    """Read-your-writes waits, fair and honest: at most so many at once per user
    and per tenant (429 beyond), never longer than asked (each read of the read
    model is bounded by the deadline too), and ended by what the projectors
    announce -- the workflow-projector's and search-indexer's NOTIFY, the
    cache-projector's tenant channel -- naming each (tenant, aggregate, version)
    they made visible. An announcement is sent only once its write is visible
    (on commit, after the refresh, after the Redis write), so a wait it satisfies
    ends without reading the store again: a wait costs one read, and a busy
    tenant wakes only the waits its versions satisfy. Polls are the fallback for
    an announcement that was lost (a listener reconnecting)."""

    def __init__(self, per_user: int, per_tenant: int) -> None:
        self.shares = Shares("concurrent consistency waits", per_user, per_tenant)
        # (store, tenant, aggregate) -> the waits for a version of it
        self.waiting: dict[tuple[str, str, UUID], set[Waiter]] = defaultdict(set)
        self.redis_tenants: Counter[str] = Counter()  # detail waits per tenant
        self.heard: set[str] = set()  # stores whose announcements reach this process now
        self.subscribed: set[str] = set()  # tenants whose detail announcements do
        # (tenant) -> called once when its first detail wait arrives / last one leaves
        self.on_first: Callable[[str], Awaitable[bool]] | None = None  # True: subscribed
        self.on_last: Callable[[str], Awaitable[None]] | None = None
        # (tenant, token) -> the trace id that wrote the token's version (traced only)
        self.trace_of: Callable[[UUID, ConsistencyToken], Awaitable[str | None]] | None = None

    def applied(self, store: str, tenant: str, aggregate: UUID, version: int) -> None:
        for waiter in self.waiting.get((store, tenant, aggregate), ()):
            if version >= waiter.version:
                waiter.reached = True
                waiter.woken.set()

    def wake_all(self) -> None:
        """Notifications may have been missed (a reconnect): every wait re-reads."""
        for waiters in self.waiting.values():
            for waiter in waiters:
                waiter.woken.set()

    async def wait(self, tenant: UUID, user: UUID, token: ConsistencyToken | None,
                   applied: Callable[[ConsistencyToken], Awaitable[int]], wait_ms: int,
                   read_model: str, poll_s: float = 1.0) -> Consistency:
        """`applied`: the version `read_model` shows for the token's aggregate.
        `poll_s`: the longest sleep between reads when no notification comes."""
        if token is None:
            return Consistency("none", 0)
        try:
            with self.shares.hold(tenant, user), await self._span(tenant, token, read_model) \
                    as span:
                started = time.monotonic()
                answer = await self._wait(SOURCES[read_model], str(tenant), token, applied,
                                          wait_ms, poll_s)
                WAITED.labels(read_model, answer.status).observe(time.monotonic() - started)
                span.set_attribute("ringiflow.consistency", answer.status)
                span.set_attribute("ringiflow.waited_ms", answer.waited_ms)
                return answer
        except Refused as exc:
            raise TooManyWaits(str(exc), retry_after_s=1) from None

    async def _span(self, tenant: UUID, token: ConsistencyToken,
                    read_model: str) -> AbstractContextManager[Any]:
        """`consistency wait <read model>`, linked to the trace of the command that
        wrote the version it waits for (the query is in the reader's own trace)."""
        if not tracing.enabled():
            return contextlib.nullcontext(trace.INVALID_SPAN)
        written = await self.trace_of(tenant, token) if self.trace_of else None
        link = tracing.remote_trace(written) if written else None
        return tracing.tracer.start_as_current_span(
            f"consistency wait {read_model}", links=[Link(link)] if link else None,
            attributes={"ringiflow.read_model": read_model,
                        "ringiflow.aggregate_id": str(token.aggregate_id),
                        "ringiflow.version": token.version})

    async def _wait(self, store: str, tenant: str, token: ConsistencyToken,
                    applied: Callable[[ConsistencyToken], Awaitable[int]], wait_ms: int,
                    poll_s: float) -> Consistency:
        started = time.monotonic()
        budget = min(max(wait_ms, 0), MAX_WAIT_MS) / 1000
        deadline = started + budget
        waiter = Waiter(token.version)
        key = (store, tenant, token.aggregate_id)
        self.waiting[key].add(waiter)
        if store == "redis":
            self.redis_tenants[tenant] += 1
            if self.redis_tenants[tenant] == 1 and self.on_first is not None:
                if await self.on_first(tenant):
                    self.subscribed.add(tenant)
        heard = tenant in self.subscribed if store == "redis" else store in self.heard
        polls = Backoff(poll_s if heard else EAGER_POLL_S, poll_s).start()
        try:
            while True:
                waiter.woken.clear()  # an announcement during the read below counts
                remaining = deadline - time.monotonic()
                try:
                    # Even with no time left one read decides reached/timeout.
                    async with asyncio.timeout(max(remaining, FIRST_READ_S)):
                        version = await applied(token)
                except TimeoutError:
                    return self._answer("timeout", started, token)
                if version >= token.version or waiter.reached:
                    return self._answer("reached", started, token)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return self._answer("timeout", started, token)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, polls.next())):
                        await waiter.woken.wait()
                if waiter.reached:  # announced as visible: no need to read it again
                    return self._answer("reached", started, token)
        finally:
            waiters = self.waiting.get(key)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self.waiting[key]
            if store == "redis":
                self.redis_tenants[tenant] -= 1
                if self.redis_tenants[tenant] <= 0:
                    del self.redis_tenants[tenant]
                    self.subscribed.discard(tenant)
                    if self.on_last is not None:
                        await self.on_last(tenant)

    @staticmethod
    def _answer(status: str, started: float, token: ConsistencyToken) -> Consistency:
        return Consistency(status, int((time.monotonic() - started) * 1000), token)


async def listen_applied(url: str, waits: Waits) -> None:
    """Wake the waits that what the projectors just committed satisfies."""
    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
            async with conn:
                await conn.execute(f"LISTEN {APPLIED_NOTIFY_CHANNEL}")
                waits.heard |= NOTIFIED
                waits.wake_all()  # whatever was applied while nobody listened
                async for note in conn.notifies():
                    store, applied = parse_applied(note.payload)
                    for tenant, aggregate, version in applied:
                        waits.applied(store, str(tenant), aggregate, version)
        except psycopg.Error as exc:
            waits.heard -= NOTIFIED
            waits.wake_all()  # they wait for what may never be announced: poll now
            log.warning("consistency waits: LISTEN %s failed (%s); polling until it is back",
                        APPLIED_NOTIFY_CHANNEL, exc)
            await asyncio.sleep(1)

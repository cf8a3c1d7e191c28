"""Read-your-writes across hops (SPEC §5): a query that brings a command's
consistency token waits, bounded, until the read model it reads has applied
that version of that aggregate, and says whether it got there."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from uuid import UUID

import psycopg

from contract import APPLIED_NOTIFY_CHANNEL, ConsistencyToken
from infra.problems import Problem
from query_api.live import Refused, Shares

log = logging.getLogger("ringiflow.query.consistency")
DEFAULT_WAIT_MS = 2000
MAX_WAIT_MS = 10_000
FIRST_READ_S = 1.0


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
        raise Problem(422, "invalid_consistency_token", "Invalid consistency token",
                      str(exc)) from None
    return tokens[0] if tokens else None


class Waits:
    """Read-your-writes waits, fair and honest: at most so many at once per user
    and per tenant (429 beyond), never longer than asked (each read of the read
    model is bounded by the deadline too), and woken by notifications -- the
    workflow-projector's NOTIFY and the cache-projector's tenant channel -- so a
    waiter re-reads when something changed instead of polling tightly."""

    def __init__(self, per_user: int, per_tenant: int) -> None:
        self.shares = Shares("concurrent consistency waits", per_user, per_tenant)
        self.wakeups: dict[str, set[asyncio.Event]] = defaultdict(set)
        # (tenant) -> called once when its first waiter arrives / last one leaves
        self.on_first: Callable[[str], Awaitable[None]] | None = None
        self.on_last: Callable[[str], Awaitable[None]] | None = None

    def wake(self, tenant: str) -> None:
        for event in self.wakeups.get(tenant, ()):
            event.set()

    def wake_all(self) -> None:
        for events in self.wakeups.values():
            for event in events:
                event.set()

    async def wait(self, tenant: UUID, user: UUID, token: ConsistencyToken | None,
                   applied: Callable[[ConsistencyToken], Awaitable[int]], wait_ms: int,
                   poll_s: float = 1.0) -> Consistency:
        """`applied`: the version the read model shows for the token's aggregate.
        `poll_s`: the longest sleep between reads when no notification comes."""
        if token is None:
            return Consistency("none", 0)
        try:
            with self.shares.hold(tenant, user):
                return await self._wait(str(tenant), token, applied, wait_ms, poll_s)
        except Refused as exc:
            raise Problem(429, "too_many_waits", "Too many consistency waits", str(exc),
                          headers={"Retry-After": "1"}) from None

    async def _wait(self, tenant: str, token: ConsistencyToken,
                    applied: Callable[[ConsistencyToken], Awaitable[int]], wait_ms: int,
                    poll_s: float) -> Consistency:
        started = time.monotonic()
        budget = min(max(wait_ms, 0), MAX_WAIT_MS) / 1000
        deadline = started + budget
        event = asyncio.Event()
        first = not self.wakeups.get(tenant)
        self.wakeups[tenant].add(event)
        if first and self.on_first is not None:
            await self.on_first(tenant)
        sleep = 0.01
        try:
            while True:
                event.clear()  # a notification during the read below counts
                remaining = deadline - time.monotonic()
                try:
                    # Even with no time left one read decides reached/timeout.
                    async with asyncio.timeout(max(remaining, FIRST_READ_S)):
                        version = await applied(token)
                except TimeoutError:
                    return self._answer("timeout", started, token)
                if version >= token.version:
                    return self._answer("reached", started, token)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return self._answer("timeout", started, token)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(remaining, sleep))
                sleep = min(sleep * 2, poll_s)
        finally:
            events = self.wakeups.get(tenant)
            if events is not None:
                events.discard(event)
                if not events:
                    del self.wakeups[tenant]
                    if self.on_last is not None:
                        await self.on_last(tenant)

    @staticmethod
    def _answer(status: str, started: float, token: ConsistencyToken) -> Consistency:
        return Consistency(status, int((time.monotonic() - started) * 1000), token)


async def listen_applied(url: str, waits: Waits) -> None:
    """Wake the waiters of each tenant the workflow-projector just wrote."""
    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
            async with conn:
                await conn.execute(f"LISTEN {APPLIED_NOTIFY_CHANNEL}")
                waits.wake_all()  # whatever was applied while nobody listened
                async for note in conn.notifies():
                    if note.payload == "*":
                        waits.wake_all()
                    else:
                        for tenant in note.payload.split(","):
                            waits.wake(tenant)
        except psycopg.Error as exc:
            log.warning("consistency waits: LISTEN %s failed (%s); polling until it is back",
                        APPLIED_NOTIFY_CHANNEL, exc)
            await asyncio.sleep(1)

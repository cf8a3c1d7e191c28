"""Read-your-writes across hops (SPEC §5): a query that brings a command's
consistency token waits, bounded, until the read model it reads has applied
that version of that aggregate, and says whether it got there."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from contract import ConsistencyToken
from infra.problems import Problem

DEFAULT_WAIT_MS = 2000
MAX_WAIT_MS = 10_000


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
    raw = header or query
    if not raw:
        return None
    try:
        return ConsistencyToken.decode(raw)
    except ValueError as exc:
        raise Problem(422, "invalid_consistency_token", "Invalid consistency token",
                      str(exc)) from None


async def wait_until(token: ConsistencyToken | None, applied: Callable[[ConsistencyToken],
                     Awaitable[int]], wait_ms: int) -> Consistency:
    """Poll `applied` (the version the read model shows for the token's aggregate)."""
    if token is None:
        return Consistency("none", 0)
    started = time.monotonic()
    deadline = started + min(max(wait_ms, 0), MAX_WAIT_MS) / 1000
    delay = 0.005
    while True:
        if await applied(token) >= token.version:
            return Consistency("reached", int((time.monotonic() - started) * 1000), token)
        if time.monotonic() >= deadline:
            return Consistency("timeout", int((time.monotonic() - started) * 1000), token)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)

"""The one backoff of the code base: exponential delays, capped, that start over after a
success; and `retry`, the loop around it. Store retries, PostgreSQL sessions lost,
consistency polls, Redis reconnects, restarts of crashed processes and servers all take
their waits from here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """first_s, first_s * factor, ... never more than most_s."""

    first_s: float
    most_s: float
    factor: float = 2.0

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt `attempt` (from 1)."""
        return min(self.most_s, self.first_s * self.factor ** max(attempt - 1, 0))

    def start(self) -> Delays:
        return Delays(self)


@dataclass
class Delays:
    """One running sequence of a Backoff: `next()` is the next wait, `reset()` starts
    over (after a success, or after a child ran long enough to count as healthy)."""

    backoff: Backoff
    attempts: int = field(default=0)

    def next(self) -> float:
        self.attempts += 1
        return self.backoff.delay(self.attempts)

    def peek(self) -> float:
        return self.backoff.delay(self.attempts + 1)

    def reset(self) -> None:
        self.attempts = 0


async def retry(work: Callable[[], Awaitable[T]], *, retry_on: tuple[type[BaseException], ...],
                backoff: Backoff, what: str, log: logging.Logger,
                attempts: int | None = None) -> T:
    """`work()` until it returns; an exception of `retry_on` waits out the backoff and
    tries again (up to `attempts` tries, or for ever), anything else propagates.
    Cancellation (shutdown) ends the wait."""
    delays = backoff.start()
    while True:
        try:
            return await work()
        except retry_on as exc:
            if attempts is not None and delays.attempts + 1 >= attempts:
                raise
            delay = delays.next()
            log.warning("%s: %s: %s; retrying in %.2f s", what, type(exc).__name__,
                        str(exc).strip()[:200], delay)
            await asyncio.sleep(delay)

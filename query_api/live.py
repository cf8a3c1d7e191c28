"""Live updates inside one query-API process: one Redis subscription, fanned
out to every local listener (WebSockets, consistency waits), and fair shares.

A connection per socket would let one user's 200 sockets exhaust the Redis pool
for everyone; here a socket costs a queue, and each user and tenant has a cap
of its own, so a flood is refused where it comes from."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from infra.retry import Backoff

log = logging.getLogger("ringiflow.query.live")

Listener = Callable[[bytes], None]
# Subscribed for the whole life of the hub: a subscription that never empties
# keeps the connection in subscriber mode (no health-check reads racing ours).
KEEPALIVE_CHANNEL = "ringiflow:query-api:hub"


def user_channel(tenant: object, user: object) -> str:
    return f"user:{tenant}:{user}"


def tenant_channel(tenant: object) -> str:
    return f"tenant:{tenant}"


class Refused(Exception):
    """Over a fair share: the message says whose and how to recover."""


@dataclass
class Shares:
    """Counts held per user and tenant against caps, for one kind of resource."""

    what: str
    per_user: int
    per_tenant: int
    total: int | None = None

    def __post_init__(self) -> None:
        self.users: Counter[tuple[object, object]] = Counter()
        self.tenants: Counter[object] = Counter()
        self.held = 0

    @contextlib.contextmanager
    def hold(self, tenant: object, user: object) -> Iterator[None]:
        if self.users[tenant, user] >= self.per_user:
            raise Refused(f"too many {self.what} for this user (limit {self.per_user}); "
                          "close some or wait for them to finish")
        if self.tenants[tenant] >= self.per_tenant:
            raise Refused(f"too many {self.what} for this tenant (limit {self.per_tenant}); "
                          "retry shortly")
        if self.total is not None and self.held >= self.total:
            raise Refused(f"this server holds its maximum of {self.total} {self.what}; "
                          "retry shortly")
        self.users[tenant, user] += 1
        self.tenants[tenant] += 1
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1
            self.users[tenant, user] -= 1
            if not self.users[tenant, user]:
                del self.users[tenant, user]
            self.tenants[tenant] -= 1
            if not self.tenants[tenant]:
                del self.tenants[tenant]


class LiveHub:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.pubsub = client.pubsub()
        self.listeners: dict[str, set[Listener]] = defaultdict(set)
        self.lock = asyncio.Lock()  # subscribe/unsubscribe commands in order
        self.task: asyncio.Task[None] | None = None
        self.available = asyncio.Event()

    async def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="live-hub")

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError):
                await self.task
        with contextlib.suppress(RedisError):
            await self.pubsub.aclose()

    async def subscribe(self, channels: list[str], listener: Listener) -> None:
        """Raises RedisError when Redis is unreachable (the caller says so)."""
        async with self.lock:
            new = [c for c in channels if not self.listeners.get(c)]
            for channel in channels:
                self.listeners[channel].add(listener)
            if new:
                try:
                    await self.pubsub.subscribe(*new)
                except RedisError:
                    self._drop(channels, listener)
                    raise

    async def unsubscribe(self, channels: list[str], listener: Listener) -> None:
        async with self.lock:
            gone = self._drop(channels, listener)
            if gone:
                with contextlib.suppress(RedisError):
                    await self.pubsub.unsubscribe(*gone)

    def _drop(self, channels: list[str], listener: Listener) -> list[str]:
        gone = []
        for channel in channels:
            held = self.listeners.get(channel)
            if held is not None:
                held.discard(listener)
                if not held:
                    del self.listeners[channel]
                    gone.append(channel)
        return gone

    async def _run(self) -> None:
        reconnects = Backoff(0.5, 5.0).start()
        while True:
            try:
                async with self.lock:
                    if not self.pubsub.subscribed:
                        await self.pubsub.subscribe(KEEPALIVE_CHANNEL)
                self.available.set()
                message = await self.pubsub.get_message(ignore_subscribe_messages=True,
                                                        timeout=1.0)
                reconnects.reset()
            except RedisError as exc:
                self.available.clear()
                delay = reconnects.next()
                log.warning("live updates: Redis unavailable (%s); retrying in %.1f s", exc,
                            delay)
                await asyncio.sleep(delay)
                continue
            if message and message["type"] == "message":
                channel = message["channel"].decode()
                for listener in list(self.listeners.get(channel, ())):
                    try:
                        listener(message["data"])
                    except Exception:  # one broken listener must not stop the others
                        log.exception("live update listener failed on %s", channel)

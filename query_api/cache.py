"""The Redis detail cache as the query API uses it: read first; on a miss,
read the event store and fill the cache -- version-guarded, so a fill never
replaces a newer entry the cache-projector wrote, and single-flight per key,
so a burst of misses for one workflow costs one event-store read."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

# Every read resolves the live namespace inside Redis (ADR 0005): one round trip, and a
# cut-over between two commands cannot split a read.
from projectors.cache.layout import APPLIED, DETAIL, FILL, LIVE, NAMESPACE_KEY


class DetailCache:
    def __init__(self, client: aioredis.Redis, ttl_s: int = 3600) -> None:
        self.client, self.ttl = client, ttl_s
        self.detail_script = client.register_script(DETAIL)
        self.applied_script = client.register_script(APPLIED)
        self.fill_script = client.register_script(FILL)
        self.inflight: dict[tuple[UUID, UUID], asyncio.Future[dict[str, Any] | None]] = {}

    async def get(self, tenant: UUID, workflow_id: UUID) -> dict[str, Any] | None:
        """The cached snapshot, or None on a miss or when Redis is down."""
        try:
            body = await self.detail_script(keys=[NAMESPACE_KEY],
                                            args=[LIVE, str(tenant), str(workflow_id)])
        except RedisError:
            return None
        return orjson.loads(body) if body else None

    async def applied_version(self, tenant: UUID, workflow_id: UUID) -> int:
        try:
            return int(await self.applied_script(keys=[NAMESPACE_KEY],
                                                 args=[LIVE, str(tenant), str(workflow_id)])
                       or 0)
        except RedisError:
            return 0

    async def load(self, tenant: UUID, workflow_id: UUID,
                   read: Callable[[], Awaitable[dict[str, Any] | None]]) -> dict[str, Any] | None:
        """Read through the event store once per key, however many ask at once."""
        key = (tenant, workflow_id)
        if key in self.inflight:
            return await asyncio.shield(self.inflight[key])
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self.inflight[key] = future
        try:
            snapshot = await read()
            if snapshot is not None:
                await self._fill(tenant, workflow_id, snapshot)
            future.set_result(snapshot)
            return snapshot
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            del self.inflight[key]
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" warning

    async def _fill(self, tenant: UUID, workflow_id: UUID, snapshot: dict[str, Any]) -> None:
        try:
            await self.fill_script(
                keys=[NAMESPACE_KEY],
                args=[LIVE, str(tenant), str(workflow_id), snapshot["version"],
                      orjson.dumps(snapshot), self.ttl])
        except RedisError:
            pass  # a cache that cannot be filled is only a slower read

"""cache-projector's writes: the Redis detail cache, exact dashboard counters, live
messages (the layout: `projectors.cache.layout`).

One Lua script per event does the version check and every write it implies,
atomically: a repeated or older event changes nothing, so counters stay exact
under redelivery and replays. Counters follow each workflow's status from its
snapshot (not event deltas), so a skipped intermediate event cannot skew them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from contract import EventName, user_of, workflow_of
from projectors.cache.layout import (
    APPLY,
    LIVE,
    NAMESPACE_KEY,
    detail_pattern,
    live_namespace,
    tenant_channel,
    user_channel,
    user_ids,
    user_names_key,
    user_versions_key,
    with_current_names,
)
from projectors.projection import Delivery, NonRetryable, Retryable, Unavailable

RETRYABLE = (RedisConnectionError, RedisTimeoutError)


def _epoch(value: str | None) -> str:
    return "" if not value else str(datetime.fromisoformat(value).timestamp())


def _day(value: str | None) -> str:
    return "" if not value else datetime.fromisoformat(value).astimezone(UTC).date().isoformat()


def messages(delivery: Delivery, stats_changed: bool) -> list[tuple[str, dict[str, Any]]]:
    """The live updates one newly applied workflow event causes."""
    e = delivery.envelope
    snapshot, tenant = workflow_of(e), e.tenant_id
    updated = {"workflow_id": str(e.aggregate_id), "version": e.version,
               "event_type": e.event_type, "status": snapshot.get("status"),
               "title": snapshot.get("title")}
    out = [(tenant_channel(tenant), {"type": "WorkflowUpdated", "payload": updated})]
    if snapshot.get("initiator_id"):
        out.append((user_channel(tenant, snapshot["initiator_id"]),
                    {"type": "WorkflowUpdated", "payload": updated}))
    if e.event_type == EventName.WORKFLOW_STEP_ASSIGNED:
        kind = "TaskAssigned" if e.payload.get("reason") == "delegated" else "ApprovalRequested"
        task = {"workflow_id": str(e.aggregate_id), "title": snapshot.get("title"),
                "step_id": e.payload.get("step_id"), "step_name": e.payload.get("step_name"),
                "priority": snapshot.get("priority"), "due_date": snapshot.get("due_date")}
        out.append((user_channel(tenant, e.payload["assignee_id"]),
                    {"type": kind, "payload": task}))
    if stats_changed:
        out.append((tenant_channel(tenant), {"type": "StatsUpdated",
                                         "payload": {"tenant_id": str(tenant)}}))
    return out


class CacheStore:
    """Writes the live namespace, or `namespace` when a rebuild fills a new one."""

    def __init__(self, redis_url: str, detail_ttl_s: int = 3600,
                 namespace: str | None = None) -> None:
        self.client = aioredis.Redis.from_url(redis_url, socket_timeout=5,
                                              socket_connect_timeout=3)
        self.ttl = detail_ttl_s
        self.namespace = namespace
        self.sha = ""

    async def _namespace(self) -> str:
        return self.namespace if self.namespace is not None else \
            await live_namespace(self.client)

    async def start(self) -> None:
        self.sha = await self.client.script_load(APPLY)

    async def close(self) -> None:
        await self.client.aclose()

    async def apply(self, batch: Sequence[Delivery]) -> None:
        workflows = sorted((d for d in batch if d.envelope.aggregate_type.value == "workflow"),
                           key=lambda d: (d.envelope.aggregate_id, d.envelope.version))
        try:
            ns = await self._namespace()
            await self._apply_users(ns, [d for d in batch
                                         if d.envelope.aggregate_type.value == "user"])
            if not workflows:
                return
            names = await self._current_names(ns, workflows)
            async with self.client.pipeline(transaction=False) as pipe:
                for delivery in workflows:
                    self._queue_apply(pipe, delivery, names)
                results = await pipe.execute()
            live = [(d, bool(changed)) for d, (applied, changed) in zip(workflows, results,
                                                                        strict=True)
                    if applied and not d.replay]
            if live:
                async with self.client.pipeline(transaction=False) as pipe:
                    for delivery, stats_changed in live:
                        for channel, message in messages(delivery, stats_changed):
                            pipe.publish(channel, orjson.dumps(message))
                    await pipe.execute()
        except RETRYABLE as exc:
            raise Unavailable(f"Redis unreachable: {exc}") from exc
        except NoScriptError as exc:  # Redis restarted empty: load the script again
            self.sha = await self.client.script_load(APPLY)
            raise Retryable("Redis lost the projection script; reloaded it") from exc
        except ResponseError as exc:
            raise NonRetryable(f"Redis refused the write: {exc}") from exc
        except RedisError as exc:
            raise Retryable(f"{type(exc).__name__}: {exc}") from exc

    def _queue_apply(self, pipe: Any, delivery: Delivery,
                     names: dict[tuple[UUID, str], str]) -> None:
        e = delivery.envelope
        tenant = e.tenant_id
        snapshot = with_current_names(workflow_of(e), lambda uid: names.get((tenant, uid)))
        args = [LIVE if self.namespace is None else self.namespace, str(tenant),
                str(e.aggregate_id), e.version, snapshot.get("status") or "",
                _epoch(snapshot.get("due_date")), _day(snapshot.get("completed_at")),
                orjson.dumps(snapshot), self.ttl]
        pipe.evalsha(self.sha, 1, NAMESPACE_KEY, *args)

    async def _apply_users(self, ns: str, deliveries: list[Delivery]) -> None:
        """Keep current names; a rename also drops cached details that show the
        old one (the next read fills them again; renames are rare)."""
        for delivery in sorted(deliveries, key=lambda d: d.envelope.version):
            e = delivery.envelope
            tenant, uid = e.tenant_id, str(e.aggregate_id)
            known = int(await self.client.hget(user_versions_key(ns, tenant), uid) or 0)
            if e.version <= known:
                continue
            await self.client.hset(user_names_key(ns, tenant), uid, user_of(e)["display_name"])
            await self.client.hset(user_versions_key(ns, tenant), uid, e.version)
            if e.event_type == EventName.USER_RENAMED:
                async for key in self.client.scan_iter(match=detail_pattern(ns, tenant),
                                                       count=500):
                    body = await self.client.get(key)
                    if body and uid.encode() in body:
                        await self.client.delete(key)

    async def _current_names(self, ns: str,
                             workflows: list[Delivery]) -> dict[tuple[UUID, str], str]:
        wanted = {(d.envelope.tenant_id, uid) for d in workflows
                  for uid in user_ids(workflow_of(d.envelope))}
        if not wanted:
            return {}
        ordered = sorted(wanted)
        async with self.client.pipeline(transaction=False) as pipe:
            for tenant, uid in ordered:
                pipe.hget(user_names_key(ns, tenant), uid)
            found = await pipe.execute()
        return {key: name.decode() for key, name in zip(ordered, found, strict=True) if name}

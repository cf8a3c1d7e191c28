"""cache-projector: Redis detail cache, exact dashboard counters, live messages.

One Lua script per event does the version check and every write it implies,
atomically: a repeated or older event changes nothing, so counters stay exact
under redelivery and replays. Counters follow each workflow's status from its
snapshot (not event deltas), so a skipped intermediate event cannot skew them.

Keys (tenant-scoped, each prefixed with the live namespace, see NAMESPACE_KEY):
  workflow:{tenant}:{id}              detail: the newest snapshot (JSON, with TTL)
  wfver:{tenant}        hash id->v     the newest version applied (no TTL: the guard)
  wfstatus:{tenant}     hash id->s     status counted for that workflow
  stats:{tenant}        hash           pending
  stats:{tenant}:completed:{day}       workflows completed (approved/rejected) that UTC day
  overdue:{tenant}      zset id->due   in-progress workflows by due date (count <= now)
  usernames:{tenant}    hash id->name  current display names (userver: their versions)
Pub/sub: `user:{tenant}:{id}` and `tenant:{id}` get {type, payload} messages (a user
id is unique per tenant only, so the user channel names the tenant too).
"""

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

from projectors.projection import Delivery, NonRetryable, Retryable, Unavailable

# The live namespace: a key prefix, "" for the first version. A rebuild fills a
# new namespace and cuts over by setting this one key (ADR 0005). Every script
# resolves it inside Redis, so a reader or the live projector can never mix
# namespaces within one call.
NAMESPACE_KEY = "ringiflow:cache:namespace"
LIVE = "*"
RESOLVE_NAMESPACE = """
local ns = ARGV[1]
if ns == '*' then ns = redis.call('GET', KEYS[1]) or '' end
"""

APPLY = RESOLVE_NAMESPACE + """
local tenant, id, v, status, due, day, body, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4]),
    ARGV[5], ARGV[6], ARGV[7], ARGV[8], tonumber(ARGV[9])
local detail, versions = ns .. 'workflow:' .. tenant .. ':' .. id, ns .. 'wfver:' .. tenant
local statuses, stats = ns .. 'wfstatus:' .. tenant, ns .. 'stats:' .. tenant
local overdue = ns .. 'overdue:' .. tenant
local completed = stats .. ':completed:' .. (day ~= '' and day or 'none')
local current = tonumber(redis.call('HGET', versions, id) or '0')
if v <= current then return {0, 0} end
redis.call('HSET', versions, id, v)
redis.call('SET', detail, body, 'EX', ttl)
local changed = 0
local old = redis.call('HGET', statuses, id) or ''
if old ~= status then
    if old == 'in_progress' then redis.call('HINCRBY', stats, 'pending', -1) end
    if status == 'in_progress' then redis.call('HINCRBY', stats, 'pending', 1) end
    if (status == 'approved' or status == 'rejected') and day ~= '' then
        redis.call('INCR', completed)
        redis.call('EXPIRE', completed, 8 * 86400)
    end
    redis.call('HSET', statuses, id, status)
    changed = 1
end
local was_overdue = redis.call('ZSCORE', overdue, id)
if status == 'in_progress' and due ~= '' then
    redis.call('ZADD', overdue, tonumber(due), id)
    if not was_overdue then changed = 1 end
elseif was_overdue then
    redis.call('ZREM', overdue, id)
    changed = 1
end
return {1, changed}
"""

DASHBOARD = RESOLVE_NAMESPACE + """
local stats = ns .. 'stats:' .. ARGV[2]
return {redis.call('HGET', stats, 'pending') or '0',
        redis.call('GET', stats .. ':completed:' .. ARGV[3]) or '0',
        redis.call('ZCOUNT', ns .. 'overdue:' .. ARGV[2], '-inf', ARGV[4])}
"""


async def live_namespace(client: aioredis.Redis) -> str:
    return ((await client.get(NAMESPACE_KEY)) or b"").decode()


RETRYABLE = (RedisConnectionError, RedisTimeoutError)


def _epoch(value: str | None) -> str:
    return "" if not value else str(datetime.fromisoformat(value).timestamp())


def _day(value: str | None) -> str:
    return "" if not value else datetime.fromisoformat(value).astimezone(UTC).date().isoformat()


def messages(delivery: Delivery, stats_changed: bool) -> list[tuple[str, dict[str, Any]]]:
    """The live updates one newly applied workflow event causes."""
    e = delivery.envelope
    snapshot, tenant = e.aggregate, e.tenant_id
    updated = {"workflow_id": str(e.aggregate_id), "version": e.version,
               "event_type": e.event_type, "status": snapshot.get("status"),
               "title": snapshot.get("title")}
    out = [(f"tenant:{tenant}", {"type": "WorkflowUpdated", "payload": updated})]
    if snapshot.get("initiator_id"):
        out.append((f"user:{tenant}:{snapshot['initiator_id']}",
                    {"type": "WorkflowUpdated", "payload": updated}))
    if e.event_type == "WorkflowStepAssigned":
        kind = "TaskAssigned" if e.payload.get("reason") == "delegated" else "ApprovalRequested"
        task = {"workflow_id": str(e.aggregate_id), "title": snapshot.get("title"),
                "step_id": e.payload.get("step_id"), "step_name": e.payload.get("step_name"),
                "priority": snapshot.get("priority"), "due_date": snapshot.get("due_date")}
        out.append((f"user:{tenant}:{e.payload['assignee_id']}",
                    {"type": kind, "payload": task}))
    if stats_changed:
        out.append((f"tenant:{tenant}", {"type": "StatsUpdated",
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
        snapshot = with_current_names(e.aggregate, lambda uid: names.get((tenant, uid)))
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
            known = int(await self.client.hget(f"{ns}userver:{tenant}", uid) or 0)
            if e.version <= known:
                continue
            await self.client.hset(f"{ns}usernames:{tenant}", uid, e.aggregate["display_name"])
            await self.client.hset(f"{ns}userver:{tenant}", uid, e.version)
            if e.event_type == "UserRenamed":
                async for key in self.client.scan_iter(match=f"{ns}workflow:{tenant}:*",
                                                       count=500):
                    body = await self.client.get(key)
                    if body and uid.encode() in body:
                        await self.client.delete(key)

    async def _current_names(self, ns: str,
                             workflows: list[Delivery]) -> dict[tuple[UUID, str], str]:
        wanted = {(d.envelope.tenant_id, uid) for d in workflows
                  for uid in user_ids(d.envelope.aggregate)}
        if not wanted:
            return {}
        ordered = sorted(wanted)
        async with self.client.pipeline(transaction=False) as pipe:
            for tenant, uid in ordered:
                pipe.hget(f"{ns}usernames:{tenant}", uid)
            found = await pipe.execute()
        return {key: name.decode() for key, name in zip(ordered, found, strict=True) if name}


def user_ids(snapshot: dict[str, Any]) -> set[str]:
    ids = {snapshot.get("initiator_id"), snapshot.get("current_assignee_id")}
    ids.update(step.get("assignee_id") for step in snapshot.get("steps", []))
    return {i for i in ids if i}


def with_current_names(snapshot: dict[str, Any], name_of: Any) -> dict[str, Any]:
    """The snapshot with every copied user name replaced by the current one."""
    out = dict(snapshot)
    for id_key, name_key in (("initiator_id", "initiator_name"),
                             ("current_assignee_id", "current_assignee_name")):
        if out.get(id_key) and (name := name_of(out[id_key])):
            out[name_key] = name
    out["steps"] = [{**step, "assignee_name": name_of(step["assignee_id"])
                     or step["assignee_name"]} for step in snapshot.get("steps", [])]
    return out


async def dashboard(client: aioredis.Redis, tenant: UUID, now: datetime) -> dict[str, int]:
    """The dashboard counters as the query API serves them (live namespace)."""
    pending, completed, overdue = await client.register_script(DASHBOARD)(
        keys=[NAMESPACE_KEY],
        args=[LIVE, str(tenant), str(now.astimezone(UTC).date()), now.timestamp()])
    return {"pending": int(pending), "completed_today": int(completed), "overdue": int(overdue)}

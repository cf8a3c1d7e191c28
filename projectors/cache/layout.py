"""The Redis read model's key layout, its Lua scripts and the reads built on them: the
one place that knows how the cache is laid out. The projector writes through it
(`projectors.cache.store`), the query API reads through it, operations verify and
repair through it, and tests look inside through it.

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

The namespace is a key prefix, "" for the first version. A rebuild fills a new one and
cuts over by setting NAMESPACE_KEY (ADR 0005). Every script resolves it inside Redis,
so a reader or the live projector can never mix namespaces within one call.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from uuid import UUID

import redis.asyncio as aioredis

from contract import WorkflowSnapshot

NAMESPACE_KEY = "ringiflow:cache:namespace"
LIVE = "*"  # a script's namespace argument: resolve the live one inside Redis
# The key families of the first version (namespace ""), which has no prefix to match.
V1_FAMILIES = ("workflow:", "wfver:", "wfstatus:", "stats:", "overdue:", "usernames:",
               "userver:")
COMPLETED_TTL_S = 8 * 86400  # a day's completed counter outlives the dashboard's week


def detail_key(ns: str, tenant: UUID | str, workflow: UUID | str) -> str:
    return f"{ns}workflow:{tenant}:{workflow}"


def detail_pattern(ns: str, tenant: UUID | str) -> str:
    return f"{ns}workflow:{tenant}:*"


def versions_key(ns: str, tenant: UUID | str) -> str:
    return f"{ns}wfver:{tenant}"


def statuses_key(ns: str, tenant: UUID | str) -> str:
    return f"{ns}wfstatus:{tenant}"


def stats_key(ns: str, tenant: UUID | str) -> str:
    return f"{ns}stats:{tenant}"


def completed_key(ns: str, tenant: UUID | str, day: str) -> str:
    return f"{ns}stats:{tenant}:completed:{day}"


def overdue_key(ns: str, tenant: UUID | str) -> str:
    return f"{ns}overdue:{tenant}"


def user_names_key(ns: str, tenant: UUID | str) -> str:
    return f"{ns}usernames:{tenant}"


def user_versions_key(ns: str, tenant: UUID | str) -> str:
    return f"{ns}userver:{tenant}"


def tenant_channel(tenant: UUID | str) -> str:
    return f"tenant:{tenant}"


def user_channel(tenant: UUID | str, user: UUID | str) -> str:
    return f"user:{tenant}:{user}"


def utc_day(timestamp: str | None) -> str:
    """The UTC day of an ISO 8601 time, as the completed counters name it."""
    return datetime.fromisoformat(timestamp).astimezone(UTC).date().isoformat() \
        if timestamp else "none"


# --- Lua: every script takes KEYS[1] = NAMESPACE_KEY, ARGV[1] = a namespace or LIVE ----

RESOLVE_NAMESPACE = """
local ns = ARGV[1]
if ns == '*' then ns = redis.call('GET', KEYS[1]) or '' end
"""

# One event of a workflow: the version check and every write it implies, atomically.
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

DETAIL = RESOLVE_NAMESPACE + """
return redis.call('GET', ns .. 'workflow:' .. ARGV[2] .. ':' .. ARGV[3])
"""

APPLIED = RESOLVE_NAMESPACE + """
return redis.call('HGET', ns .. 'wfver:' .. ARGV[2], ARGV[3])
"""

# A read-through fill: never replaces a newer entry the projector wrote.
FILL = RESOLVE_NAMESPACE + """
local applied = tonumber(redis.call('HGET', ns .. 'wfver:' .. ARGV[2], ARGV[3]) or '0')
if tonumber(ARGV[4]) >= applied then
    redis.call('SET', ns .. 'workflow:' .. ARGV[2] .. ':' .. ARGV[3], ARGV[5], 'EX',
               tonumber(ARGV[6]))
    return 1
end
return 0
"""

# Pending is a function of the statuses the cache holds; counted inside Redis,
# atomically with respect to the projector's own scripts, so it cannot drift against
# events the projector applies meanwhile.
RECOUNT_PENDING = RESOLVE_NAMESPACE + """
local n = 0
for _, status in ipairs(redis.call('HVALS', ns .. 'wfstatus:' .. ARGV[2])) do
    if status == 'in_progress' then n = n + 1 end
end
redis.call('HSET', ns .. 'stats:' .. ARGV[2], 'pending', n)
return n
"""


async def live_namespace(client: aioredis.Redis) -> str:
    return ((await client.get(NAMESPACE_KEY)) or b"").decode()


async def dashboard(client: aioredis.Redis, tenant: UUID, now: datetime) -> dict[str, int]:
    """The dashboard counters as the query API serves them (live namespace)."""
    pending, completed, overdue = await client.register_script(DASHBOARD)(
        keys=[NAMESPACE_KEY],
        args=[LIVE, str(tenant), str(now.astimezone(UTC).date()), now.timestamp()])
    return {"pending": int(pending), "completed_today": int(completed), "overdue": int(overdue)}


# --- what the cached detail holds: the snapshot with user names kept current -----------


def user_ids(snapshot: WorkflowSnapshot) -> set[str]:
    ids = {snapshot.get("initiator_id"), snapshot.get("current_assignee_id")}
    ids.update(step.get("assignee_id") for step in snapshot.get("steps", []))
    return {i for i in ids if i}


def with_current_names(snapshot: WorkflowSnapshot,
                       name_of: Callable[[str], str | None]) -> WorkflowSnapshot:
    """The snapshot with every copied user name replaced by the current one."""
    out = dict(snapshot)
    for id_key, name_key in (("initiator_id", "initiator_name"),
                             ("current_assignee_id", "current_assignee_name")):
        if out.get(id_key) and (name := name_of(out[id_key])):
            out[name_key] = name
    out["steps"] = [{**step, "assignee_name": name_of(step["assignee_id"])
                     or step["assignee_name"]} for step in snapshot.get("steps", [])]
    return out  # type: ignore[return-value]

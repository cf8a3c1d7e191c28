"""The Redis read model's versions (ADR 0005): key namespaces ("" for v1, "v2:", ...)
with NAMESPACE_KEY naming the live one; built, switched, verified and repaired here."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any
from uuid import UUID

import orjson
import psycopg

from infra.clients import redis_client
from infra.settings import Settings
from projectors.cache.layout import (
    COMPLETED_TTL_S,
    LIVE,
    NAMESPACE_KEY,
    RECOUNT_PENDING,
    V1_FAMILIES,
    completed_key,
    detail_key,
    live_namespace,
    overdue_key,
    stats_key,
    statuses_key,
    utc_day,
    versions_key,
)
from projectors.cache.store import CacheStore
from projectors.projection import Store
from projectors.versioned import ByTenant, Difference, Newest, VersionedStore, compare


def counters(rows: Newest, today: date) -> dict[UUID, dict[str, int]]:
    """The dashboard counters the snapshots imply, per tenant."""
    out: dict[UUID, dict[str, int]] = {}
    for row in rows:
        tenant_counters = out.setdefault(row["tenant_id"], {"pending": 0, "completed_today": 0})
        snapshot = row["aggregate"]
        if snapshot["status"] == "in_progress":
            tenant_counters["pending"] += 1
        done = snapshot.get("completed_at")
        if snapshot["status"] in ("approved", "rejected") and done and \
                datetime.fromisoformat(done).astimezone(UTC).date() == today:
            tenant_counters["completed_today"] += 1
    return out


class CacheVersions(VersionedStore):
    """Key namespaces: "" for v1, "v2:", "v3:" ...; the pointer key names the live one."""

    projector = "cache-projector"
    aggregate_types = ("workflow", "user")

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.client = redis_client(settings.require("redis_url"))

    @staticmethod
    def namespace(version: str) -> str:
        return "" if version == "v1" else f"{version}:"

    def named(self, number: int) -> str:
        return f"v{number}"

    async def live(self) -> str | None:
        pointer = ((await self.client.get(NAMESPACE_KEY)) or b"").decode()
        return pointer.rstrip(":") or "v1"

    async def existing(self) -> list[str]:
        with psycopg.connect(self.database_url) as conn:
            known = [r[0] for r in conn.execute(
                "SELECT target FROM streams.rebuilds WHERE projector = %s "
                "AND status <> 'dropped'", (self.projector,))]
        return [*known, (await self.live()) or "v1"]

    async def _delete(self, version: str) -> int:
        patterns = [f"{f}*" for f in V1_FAMILIES] if version == "v1" \
            else [f"{self.namespace(version)}*"]
        deleted = 0
        for pattern in patterns:
            batch: list[bytes] = []
            async for key in self.client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += await self.client.unlink(*batch)
                    batch = []
            if batch:
                deleted += await self.client.unlink(*batch)
        return deleted

    async def create(self, target: str, live: str | None) -> None:
        await self._delete(target)  # keys an unrecorded earlier attempt left behind

    def store(self, target: str) -> Store:
        return CacheStore(self.settings.require("redis_url"), namespace=self.namespace(target))

    async def count(self, target: str) -> int:
        total = 0
        async for key in self.client.scan_iter(match=versions_key(self.namespace(target), "*"),
                                               count=1000):
            total += await self.client.hlen(key)
        return total

    async def cut_over(self, target: str, live: str | None) -> None:
        if target == "v1":
            await self.client.delete(NAMESPACE_KEY)
        else:
            await self.client.set(NAMESPACE_KEY, self.namespace(target))

    async def drop(self, version: str) -> None:
        await self._delete(version)

    async def close(self) -> None:
        await self.client.aclose()

    async def verify(self, newest: Newest, tenant: UUID | None) -> list[Difference]:
        """Each workflow's cached version and status, and each tenant's counters."""
        today = datetime.now(UTC).date()
        ns = await live_namespace(self.client)
        tenants = {r["tenant_id"] for r in newest} | ({tenant} if tenant else set())
        actual: dict[UUID, dict[str, Any]] = {}
        for t in tenants:
            statuses = await self.client.hgetall(statuses_key(ns, t))
            for wid, version in (await self.client.hgetall(versions_key(ns, t))).items():
                actual[UUID(wid.decode())] = {"version": int(version),
                                              "status": (statuses.get(wid) or b"").decode()
                                              or None}
        differences = compare(newest, actual, "cached", lambda row: {
            "version": row["version"], "status": row["aggregate"]["status"]})
        expected = counters(newest, today)
        for t in tenants:
            pending = int(await self.client.hget(stats_key(ns, t), "pending") or 0)
            completed = int(await self.client.get(completed_key(ns, t, str(today))) or 0)
            wanted = expected.get(t, {"pending": 0, "completed_today": 0})
            if pending != wanted["pending"]:
                differences.append(Difference(t, "stats.pending", wanted["pending"], pending))
            if completed != wanted["completed_today"]:
                differences.append(Difference(t, "stats.completed_today",
                                              wanted["completed_today"], completed))
        return differences

    async def forget(self, by_tenant: ByTenant, newest: Newest) -> None:
        """A cached copy with a wrong, higher version would shadow the replay: drop it,
        taking it out of the counters it was in, so the replay counts it once."""
        snapshots = {r["aggregate_id"]: r["aggregate"] for r in newest}
        ns = await live_namespace(self.client)
        for t, wids in by_tenant.items():
            for wid in wids:
                status = await self.client.hget(statuses_key(ns, t), str(wid))
                if status == b"in_progress":
                    await self.client.hincrby(stats_key(ns, t), "pending", -1)
                elif status in (b"approved", b"rejected"):
                    cached = await self.client.get(detail_key(ns, t, wid))
                    done = (orjson.loads(cached) if cached else snapshots.get(wid, {})) \
                        .get("completed_at")
                    day = completed_key(ns, t, utc_day(done))
                    if done and await self.client.exists(day):
                        await self.client.decr(day)
                await self.client.hdel(versions_key(ns, t), str(wid))
                await self.client.hdel(statuses_key(ns, t), str(wid))
                await self.client.zrem(overdue_key(ns, t), str(wid))
                await self.client.delete(detail_key(ns, t, wid))

    async def recount(self, differences: list[Difference], newest: Newest,
                      tenant: UUID | None) -> None:
        """Pending recounted inside Redis from the cache's own statuses, for every
        tenant a difference touched; today's completed counter set from the events
        table where it was wrong (completion days are not kept per workflow in the
        cache; exact when the projector is caught up, which is when verify runs)."""
        tenants = {d.aggregate_id for d in differences if d.field.startswith("stats.")}
        tenants |= {r["tenant_id"] for r in newest
                    if r["aggregate_id"] in {d.aggregate_id for d in differences}}
        recount = self.client.register_script(RECOUNT_PENDING)
        for t in tenants:
            await recount(keys=[NAMESPACE_KEY], args=[LIVE, str(t)])
        skewed_days = {d.aggregate_id for d in differences if d.field == "stats.completed_today"}
        if skewed_days:
            today = datetime.now(UTC).date()
            counted = counters(newest, today)
            ns = await live_namespace(self.client)
            for t in skewed_days:
                await self.client.set(completed_key(ns, t, str(today)),
                                      counted.get(t, {}).get("completed_today", 0),
                                      ex=COMPLETED_TTL_S)

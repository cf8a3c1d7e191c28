"""Lane ownership: which relay publishes which aggregates.

Each aggregate hashes to one of LANES lanes (a generated column of the outbox).
A relay owns a lane by holding a PostgreSQL advisory lock on the connection it
publishes with, so ownership ends exactly when that session does (crash,
network loss, Postgres restart), and no two relays ever publish one aggregate
at the same time. Relays count each other through a shared membership lock
and balance to ceil(LANES / relays) lanes each.
"""

from __future__ import annotations

import math

from psycopg import AsyncConnection

LANES = 32  # must match migration 0002
NAMESPACE = 0x52494E47  # "RING": the advisory-lock class of all relay locks
MEMBERSHIP = 1000  # objid of the shared lock every live relay holds


class Lanes:
    def __init__(self) -> None:
        self.owned: set[int] = set()

    async def join(self, conn: AsyncConnection) -> None:
        self.owned.clear()
        await conn.execute("SELECT pg_advisory_lock_shared(%s, %s)", (NAMESPACE, MEMBERSHIP))

    async def members(self, conn: AsyncConnection) -> int:
        cur = await conn.execute(
            # Advisory locks live per database; relays of other databases on the same
            # server are not members of this one.
            "SELECT count(DISTINCT pid) FROM pg_locks WHERE locktype = 'advisory' AND "
            "database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND "
            "classid = %s::bigint::oid AND objid = %s::bigint::oid AND objsubid = 2 AND granted",
            (NAMESPACE, MEMBERSHIP))
        row = await cur.fetchone()
        return max(1, int(row[0]) if row else 1)

    async def rebalance(self, conn: AsyncConnection) -> None:
        """Give up lanes beyond this relay's fair share, then take free ones up to it.
        Called between batches, so a released lane has nothing in flight."""
        target = math.ceil(LANES / await self.members(conn))
        for lane in sorted(self.owned)[target:]:
            await conn.execute("SELECT pg_advisory_unlock(%s, %s)", (NAMESPACE, lane))
            self.owned.discard(lane)
        wanted = target - len(self.owned)
        if wanted <= 0:
            return
        cur = await conn.execute(
            "SELECT lane FROM generate_series(0, %s) AS lane "
            "WHERE lane <> ALL(%s) AND pg_try_advisory_lock(%s, lane)",
            (LANES - 1, list(self.owned), NAMESPACE))
        for (lane,) in await cur.fetchall():
            if len(self.owned) < target:
                self.owned.add(lane)
            else:  # over-acquired by a racing scan: hand it straight back
                await conn.execute("SELECT pg_advisory_unlock(%s, %s)", (NAMESPACE, lane))

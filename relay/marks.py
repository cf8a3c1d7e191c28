"""How far the broker has acknowledged each lane in each partition, and whether
it still holds that: a broker that restarted empty (or lost a partition's tail)
must be re-filled in version order before anything new goes out, or a consumer
would see version 15 of an aggregate before versions 1..14 (ADR 0003).

Kept in memory as acknowledgements arrive, written to event_store.relay_marks
at most once a second and at shutdown, read back when a relay takes a lane."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from psycopg import AsyncConnection

from relay.publisher import Outcome, Row

Key = tuple[int, str, int]  # lane, topic, partition


@dataclass
class Marks:
    next_offset: dict[Key, int] = field(default_factory=dict)
    dirty: set[Key] = field(default_factory=set)

    def advance(self, rows: Iterable[Row], outcome: Outcome) -> list[str]:
        """Record what was acknowledged; name any partition whose offsets went
        back (the broker lost history between two checks).

        The mark is one past the *first* offset this batch got in the partition,
        not the last: Tansu reports a partition's end as one past the first
        offset of its newest produce request, and a batch's requests never start
        before the batch's first record. So a healthy broker always reaches the
        mark, and one that restarted empty (or lost more than the newest batch)
        never does."""
        regressed = []
        first: dict[tuple[str, int], int] = {}
        acked = []
        for row in rows:
            where = outcome.offsets.get(row.id)
            if where is None:
                continue
            partition, offset = where
            acked.append((row, partition, offset))
            first[(row.topic, partition)] = min(offset, first.get((row.topic, partition), offset))
        for row, partition, offset in acked:
            key = (row.lane, row.topic, partition)
            known = self.next_offset.get(key, 0)
            if offset < known:
                # Offsets only grow: a new record below an earlier batch's means the
                # partition's log started over.
                if f"{row.topic}[{partition}]" not in regressed:
                    regressed.append(f"{row.topic}[{partition}]")
                continue
            mark = first[(row.topic, partition)] + 1
            if mark > known:
                self.next_offset[key] = mark
                self.dirty.add(key)
        return regressed

    def lost(self, ends: dict[tuple[str, int], int], lanes: Collection[int]) -> list[str]:
        """Partitions that end before what these lanes had acknowledged there."""
        found = {}
        for (lane, topic, partition), offset in self.next_offset.items():
            end = ends.get((topic, partition), 0)
            if lane in lanes and end < offset:
                found[(topic, partition)] = max(offset, found.get((topic, partition), 0))
        return [f"{topic}[{partition}] ends at {ends.get((topic, partition), 0)}, "
                f"{offset} were acknowledged"
                for (topic, partition), offset in sorted(found.items())]

    async def load(self, conn: AsyncConnection, lanes: Collection[int]) -> None:
        cur = await conn.execute(
            "SELECT lane, topic, partition, next_offset FROM event_store.relay_marks "
            "WHERE lane = ANY(%s)", (list(lanes),))
        for lane, topic, partition, offset in await cur.fetchall():
            key = (lane, topic, partition)
            self.next_offset[key] = max(offset, self.next_offset.get(key, 0))

    async def flush(self, conn: AsyncConnection) -> None:
        if not self.dirty:
            return
        keys = sorted(self.dirty)
        await conn.execute(
            "INSERT INTO event_store.relay_marks AS m (lane, topic, partition, next_offset) "
            "SELECT * FROM unnest(%s::smallint[], %s::text[], %s::int[], %s::bigint[]) "
            "ON CONFLICT (lane, topic, partition) DO UPDATE SET "
            "next_offset = greatest(m.next_offset, EXCLUDED.next_offset), "
            "updated_at = clock_timestamp()",
            ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys],
             [self.next_offset[k] for k in keys]))
        self.dirty.clear()

    async def forget(self, conn: AsyncConnection, lanes: Collection[int]) -> None:
        """After the lanes' history was re-queued: the broker's new log starts over."""
        await conn.execute("DELETE FROM event_store.relay_marks WHERE lane = ANY(%s)",
                           (list(lanes),))
        self.drop(lanes)

    def drop(self, lanes: Collection[int]) -> None:
        """Lanes handed to another relay: their marks are its business now."""
        for key in [k for k in self.next_offset if k[0] in lanes]:
            del self.next_offset[key]
            self.dirty.discard(key)

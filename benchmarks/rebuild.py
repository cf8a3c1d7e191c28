"""Blue/green rebuild throughput (issue 7).

    python -m benchmarks.rebuild [--workflows 3000] [--rounds 3]

Realistic workflows (the real domain) are appended to the events table of an
embedded stack. For each versioned read model:
  * baseline, same run: the same events, already in memory, applied straight to
    a fresh scratch version through the store's batched apply (no reading, no
    bookkeeping) -- what the store itself can take;
  * rebuild: `ringiflow rebuild <projector> --drop-old` end to end -- reading the
    events table in passes, the new version, bookkeeping, check and cut-over.
Medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from benchmarks.common import add_broker_flag, embedded_stack
from infra.settings import Settings
from operations.rebuild import run_rebuild
from projectors.catalogue import CATALOGUE, VERSIONED
from projectors.projection import Delivery
from tests.events import append
from tests.scenarios import build_world

PROJECTORS = ("workflow-projector", "cache-projector", "search-indexer")


def seed(settings: Settings, workflows: int) -> list[Delivery]:
    deliveries = []
    for chunk in range(0, workflows, 200):
        world = build_world(workflows=min(200, workflows - chunk), seed=chunk)
        for start in range(0, len(world.events), 500):
            append(settings.database_url or "", world.events[start:start + 500])
        deliveries += [Delivery(e, replay=True) for e in world.events]
    return deliveries


async def baseline(settings: Settings, projector: str, deliveries: list[Delivery],
                   scratch_number: int) -> float:
    versions = VERSIONED[projector](settings)
    scratch = versions.named(scratch_number)
    await versions.create(scratch, await versions.live())
    handles = CATALOGUE[projector](settings).handles
    mine = [d for d in deliveries if handles(d.envelope.event_type)]
    store = versions.store(scratch)
    await store.start()
    started = time.perf_counter()
    for start in range(0, len(mine), 1000):
        await store.apply(mine[start:start + 1000])
    elapsed = time.perf_counter() - started
    await store.close()
    await versions.drop(scratch)
    await versions.close()
    return len(mine) / elapsed


async def main(workflows: int, rounds: int, broker: str) -> None:
    with embedded_stack(broker=broker) as settings:
        deliveries = seed(settings, workflows)
        print(f"{len(deliveries):,} events of {workflows:,} workflows in the events table; "
              f"medians of {rounds} rounds")
        for projector in PROJECTORS:
            rebuilt, raw = [], []
            for round_ in range(rounds):
                raw.append(await baseline(settings, projector, deliveries, 900 + round_))
                result = await run_rebuild(settings, projector, drop_old=True)
                rebuilt.append(result.events_done / result.seconds)
            rate, alone = statistics.median(rebuilt), statistics.median(raw)
            print(f"{projector:<20} rebuild {rate:>8,.0f} events/s   store alone "
                  f"{alone:>8,.0f} events/s   = {rate / alone:.2f} x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--workflows", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    add_broker_flag(parser)
    args = parser.parse_args()
    asyncio.run(main(args.workflows, args.rounds, args.broker))

"""Blue/green rebuild throughput (issue 7).

    python -m benchmarks.rebuild [--workflows 3000]

Realistic workflows (the real domain) are appended to the events table of an
embedded stack. For each versioned read model:
  * baseline, same run: the same events, already in memory, applied straight to
    the live version through the store's batched apply (no reading, no
    bookkeeping) -- what the store itself can take;
  * rebuild: `ringiflow rebuild <projector>` end to end -- reading the events
    table in passes, the new version, bookkeeping, check and cut-over.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from benchmarks.common import embedded_stack
from infra.settings import Settings
from projectors.catalogue import CATALOGUE
from projectors.projection import Delivery
from ringiflow.rebuild import run_rebuild
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


async def baseline(settings: Settings, projector: str, deliveries: list[Delivery]) -> float:
    projection = CATALOGUE[projector](settings)
    mine = [d for d in deliveries if projection.handles(d.envelope.event_type)]
    await projection.store.start()
    started = time.perf_counter()
    for start in range(0, len(mine), 1000):
        await projection.store.apply(mine[start:start + 1000])
    elapsed = time.perf_counter() - started
    await projection.store.close()
    return len(mine) / elapsed


async def main(workflows: int) -> None:
    with embedded_stack() as settings:
        deliveries = seed(settings, workflows)
        print(f"{len(deliveries):,} events of {workflows:,} workflows in the events table")
        for projector in PROJECTORS:
            raw = await baseline(settings, projector, deliveries)
            result = await run_rebuild(settings, projector)
            rate = result.events_done / result.seconds
            print(f"{projector:<20} rebuild {rate:>8,.0f} events/s ({result.events_done:,} "
                  f"in {result.seconds:.1f} s, {result.swapped_from} -> {result.target})  "
                  f"store alone {raw:>8,.0f} events/s  = {rate / raw:.2f} x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--workflows", type=int, default=3000)
    args = parser.parse_args()
    asyncio.run(main(args.workflows))

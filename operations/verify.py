"""Verify a read model against the events table and repair what differs (`ringiflow
verify [--repair]`): the verify step of the resync runbook (docs/RUNBOOK.md). Which
read model, and how it is read back and compared, is the catalogue's business: each
projection names its versioned store (`projectors.versioned`)."""

from __future__ import annotations

import asyncio
from uuid import UUID

from infra.settings import Settings
from operations.replay import replay
from operations.scope import Scope, newest_snapshots
from projectors.catalogue import CATALOGUE, versioned
from projectors.versioned import Difference

__all__ = ["Difference", "repair", "verifiable", "verify"]


def verifiable() -> list[str]:
    """The projections whose read model can be verified (the others write topics)."""
    return [group for group in CATALOGUE if versioned(group) is not None]


def verify(settings: Settings, projector: str, tenant: UUID | None = None) -> list[Difference]:
    versions_of = versioned(projector)
    if versions_of is None:
        raise ValueError(f"verify compares read models; {projector} writes topics. Verify "
                         f"one of {', '.join(verifiable())}")

    async def run() -> list[Difference]:
        versions = versions_of(settings)
        try:
            return await versions.verify(newest_snapshots(settings, Scope(tenant)), tenant)
        finally:
            await versions.close()

    return asyncio.run(run())


def repair(settings: Settings, projector: str, tenant: UUID | None,
           differences: list[Difference]) -> list[UUID]:
    """Forget exactly the aggregates that differ and replay them from the events table;
    then let the read model recount what it derives from them (the cache's counters)."""
    versions_of = versioned(projector)
    if versions_of is None:
        raise ValueError(f"{projector} has no read model to repair")
    ids = tuple(sorted({d.aggregate_id for d in differences
                        if not d.field.startswith("stats.")}, key=str))
    if ids:
        replay(settings, projector, Scope(tenant=tenant, aggregates=ids))  # forgets first

    async def recount() -> None:
        versions = versions_of(settings)
        try:
            await versions.recount(differences, newest_snapshots(settings, Scope(tenant)),
                                   tenant)
        finally:
            await versions.close()

    asyncio.run(recount())
    return list(ids)

"""A read model that can be versioned (ADR 0005): a new version built beside the live
one, switched to in one atomic step, counted before it goes live, dropped when no
longer wanted; read back and compared with the events table (verify); told to forget
aggregates before they are replayed (repair). Each store's home implements it
(`projectors.workflows.versions`, `.cache.versions`, `.search.versions`), the
catalogue names it per projection, and operations (rebuild, verify, repair) only look
it up there."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from infra.settings import Settings, libpq_url
from projectors.projection import Store

# The newest event of each aggregate, as operations read it from the events table:
# tenant_id, aggregate_id, version and `aggregate` (the snapshot after it).
Newest = list[dict[str, Any]]
ByTenant = dict[UUID, list[UUID]]


class RefusedCutOver(RuntimeError):
    """The new version is not complete, or could not be switched to; the live one stays."""


@dataclass(frozen=True)
class Difference:
    aggregate_id: UUID  # for a tenant-wide counter: the tenant
    field: str
    expected: Any
    actual: Any


def version_number(version: str) -> int:
    match = re.search(r"v(\d+):?$", version)
    return int(match.group(1)) if match else 0


def compare(rows: Newest, actual: dict[UUID, dict[str, Any]], kind: str,
            wanted: Callable[[dict[str, Any]], dict[str, Any]]) -> list[Difference]:
    """Each workflow's expected fields against the read model's copy (consumed from
    `actual`); copies with no workflow behind them are differences too."""
    differences = []
    for row in rows:
        wid = row["aggregate_id"]
        have = actual.pop(wid, None)
        if have is None:
            differences.append(Difference(wid, kind, "present", "missing"))
            continue
        differences += [Difference(wid, name, value, have.get(name))
                        for name, value in wanted(row).items()
                        if not _same(have.get(name), value)]
    return differences + [Difference(wid, kind, "absent", "present") for wid in actual]


def _same(a: Any, b: Any) -> bool:
    return (str(a) if a is not None else None) == (str(b) if b is not None else None)


class VersionedStore(ABC):
    """How one projection's read model is versioned, built, switched and checked."""

    projector: str
    aggregate_types: tuple[str, ...]  # what a rebuild reads from the events table

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database_url = libpq_url(settings.require("database_url"))

    @abstractmethod
    async def live(self) -> str | None: ...

    @abstractmethod
    async def existing(self) -> list[str]: ...

    @abstractmethod
    def named(self, number: int) -> str: ...

    def next_version(self, known: list[str]) -> str:
        return self.named(max([version_number(v) for v in known] or [0]) + 1)

    @abstractmethod
    async def create(self, target: str, live: str | None) -> None:
        """An empty version, complete or not at all (a crash leaves no half of it)."""

    @abstractmethod
    def store(self, target: str) -> Store:
        """A store that writes this version (a rebuild fills it through this)."""

    @abstractmethod
    async def count(self, target: str) -> int:
        """Workflows the version holds (checked before it goes live)."""

    @abstractmethod
    async def cut_over(self, target: str, live: str | None) -> None:
        """Make `target` the live version, atomically for every reader."""

    @abstractmethod
    async def drop(self, version: str) -> None: ...

    @abstractmethod
    async def verify(self, newest: Newest, tenant: UUID | None) -> list[Difference]:
        """The live version read back and compared with the events table's newest
        snapshots (`newest`, scoped to `tenant` when given)."""

    async def forget(self, by_tenant: ByTenant, newest: Newest) -> None:
        """Drop these aggregates from the live version before they are replayed, where
        a wrong copy would shadow the replay (a version guard keeps a higher one)."""
        return None

    async def recount(self, differences: list[Difference], newest: Newest,
                      tenant: UUID | None) -> None:
        """After a repair: make derived counters true again (where there are any)."""
        return None

    async def close(self) -> None:
        return None

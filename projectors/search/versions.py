"""The OpenSearch read model's versions (ADR 0005): indices `<alias>-vN`, the alias
naming the live one; built, switched and verified here. Nothing needs forgetting before
a replay: a missing or older document is overwritten, and one with a newer external
version than the events table cannot be (by design of external versioning, and a
deleted one leaves a tombstone with a newer version too): those need a rebuild."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from infra.clients import opensearch_client
from infra.settings import Settings
from projectors.projection import NonRetryable, Store
from projectors.search.store import SearchStore, create_index
from projectors.versioned import Difference, Newest, VersionedStore, compare


async def search_documents(client: Any, alias: str,
                            tenant: UUID | None) -> dict[UUID, dict[str, Any]]:
    query: dict[str, Any] = {"term": {"tenant_id": str(tenant)}} if tenant \
        else {"match_all": {}}
    found: dict[UUID, dict[str, Any]] = {}
    after: list[Any] | None = None
    while True:
        body: dict[str, Any] = {"query": query, "size": 1000, "sort": [{"workflow_id": "asc"}],
                                "_source": ["workflow_id", "tenant_id", "version", "status"]}
        if after:
            body["search_after"] = after
        hits = (await client.search(index=alias, body=body))["hits"]["hits"]
        for hit in hits:
            found[UUID(hit["_source"]["workflow_id"])] = hit["_source"]
        if len(hits) < 1000:
            return found
        after = hits[-1]["sort"]


class SearchVersions(VersionedStore):
    """Indices `<alias>-vN`; the alias names the live one."""

    projector = "search-indexer"
    aggregate_types = ("workflow",)

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.alias = settings.search_alias
        self.client = opensearch_client(settings.require("opensearch_url"))

    def named(self, number: int) -> str:
        return f"{self.alias}-v{number}"

    async def live(self) -> str | None:
        if not await self.client.indices.exists_alias(name=self.alias):
            return None
        return sorted(await self.client.indices.get_alias(name=self.alias))[0]

    async def existing(self) -> list[str]:
        pattern = f"{self.alias}-v*"
        return list(await self.client.indices.get(index=pattern)) \
            if await self.client.indices.exists(index=pattern) else []

    async def create(self, target: str, live: str | None) -> None:
        if await self.client.indices.exists(index=target):
            await self.client.indices.delete(index=target)  # an unrecorded earlier attempt
        try:
            await create_index(self.client, target)
        except NonRetryable as exc:  # the CLI reports RuntimeErrors as errors, exit 2
            raise RuntimeError(str(exc)) from exc

    def store(self, target: str) -> Store:
        return SearchStore(self.settings.require("opensearch_url"), alias=target)

    async def count(self, target: str) -> int:
        await self.client.indices.refresh(index=target)
        return int((await self.client.count(index=target))["count"])

    async def cut_over(self, target: str, live: str | None) -> None:
        current = list(await self.client.indices.get_alias(name=self.alias)) \
            if await self.client.indices.exists_alias(name=self.alias) else []
        actions: list[dict[str, Any]] = [{"remove": {"index": i, "alias": self.alias}}
                                         for i in current]
        actions.append({"add": {"index": target, "alias": self.alias}})
        await self.client.indices.update_aliases(body={"actions": actions})

    async def drop(self, version: str) -> None:
        if await self.client.indices.exists(index=version):
            await self.client.indices.delete(index=version)

    async def close(self) -> None:
        await self.client.close()

    async def verify(self, newest: Newest, tenant: UUID | None) -> list[Difference]:
        """Each workflow's indexed version and status."""
        await self.client.indices.refresh(index=self.alias)
        actual = await search_documents(self.client, self.alias, tenant)
        return compare(newest, actual, "document", lambda row: {
            "version": row["version"], "status": row["aggregate"]["status"]})

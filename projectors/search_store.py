"""search-indexer: one OpenSearch document per workflow behind an alias.

Writes use external versioning with the aggregate version, so OpenSearch itself
refuses an older or repeated snapshot (409, which here means "already newer").
Japanese text is analysed with kuromoji where the server has it, cjk bigrams
otherwise; titles also get an English sub-field."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from opensearchpy import AsyncOpenSearch
from opensearchpy.exceptions import (
    ConnectionError as OSConnectionError,
)
from opensearchpy.exceptions import (
    ConnectionTimeout,
    OpenSearchException,
    RequestError,
    TransportError,
)

from projectors.projection import Delivery, NonRetryable, Retryable, Unavailable
from projectors.workflow_store import newest_by_aggregate

log = logging.getLogger("ringiflow.search")

ALIAS = "ringiflow-workflows"
INDEX_VERSION = 1


def index_body(japanese_tokenizer: str) -> dict[str, Any]:
    ja = {"type": "custom", "tokenizer": japanese_tokenizer,
          "filter": ["cjk_width", "lowercase"]}
    if japanese_tokenizer == "standard":
        ja["filter"] = ["cjk_width", "lowercase", "cjk_bigram"]
    text = {"type": "text", "analyzer": "ja",
            "fields": {"en": {"type": "text", "analyzer": "english"}}}
    return {
        "settings": {"number_of_shards": 1, "analysis": {"analyzer": {"ja": ja}}},
        "mappings": {"dynamic": "strict", "properties": {
            "tenant_id": {"type": "keyword"}, "workflow_id": {"type": "keyword"},
            "title": text, "description": text, "comments": text,
            "definition_name": {"type": "keyword"}, "status": {"type": "keyword"},
            "priority": {"type": "keyword"}, "initiator_id": {"type": "keyword"},
            "initiator_name": {"type": "keyword"}, "current_assignee_id": {"type": "keyword"},
            "current_assignee_name": {"type": "keyword"}, "due_date": {"type": "date"},
            "created_at": {"type": "date"}, "updated_at": {"type": "date"},
            "version": {"type": "long"},
        }},
    }


def document(snapshot: dict[str, Any], tenant_id: str) -> dict[str, Any]:
    return {
        "tenant_id": tenant_id, "workflow_id": snapshot["id"], "title": snapshot["title"],
        "description": snapshot.get("description") or "",
        "comments": [c["body"] for c in snapshot.get("comments", [])],
        "definition_name": snapshot.get("definition_name"), "status": snapshot.get("status"),
        "priority": snapshot.get("priority"), "initiator_id": snapshot.get("initiator_id"),
        "initiator_name": snapshot.get("initiator_name"),
        "current_assignee_id": snapshot.get("current_assignee_id"),
        "current_assignee_name": snapshot.get("current_assignee_name"),
        "due_date": snapshot.get("due_date"), "created_at": snapshot.get("created_at"),
        "updated_at": snapshot.get("updated_at"), "version": snapshot["version"],
    }


class SearchStore:
    """`searchable_at_once`: each bulk refreshes the index before it returns, so what
    the indexer applied (and announced) is already found by a search -- one refresh
    per batch, however many readers wait, instead of one per waiting query. A
    rebuild leaves it off and lets the index refresh on its own schedule."""

    def __init__(self, opensearch_url: str, alias: str = ALIAS,
                 searchable_at_once: bool = False) -> None:
        self.client = AsyncOpenSearch(hosts=[opensearch_url], timeout=30, max_retries=0)
        self.alias = alias
        self.searchable_at_once = searchable_at_once

    async def start(self) -> None:
        await ensure_index(self.client, self.alias)

    async def close(self) -> None:
        await self.client.close()

    async def apply(self, batch: Sequence[Delivery]) -> None:
        newest = newest_by_aggregate(
            [d for d in batch if d.envelope.aggregate_type.value == "workflow"])
        if not newest:
            return
        body: list[dict[str, Any]] = []
        for delivery in newest:
            e = delivery.envelope
            body.append({"index": {"_index": self.alias, "_id": str(e.aggregate_id),
                                   "version": e.version, "version_type": "external"}})
            body.append(document(e.aggregate, str(e.tenant_id)))
        try:
            result = await self.client.bulk(
                body=body, params={"refresh": "true"} if self.searchable_at_once else None)
        except (OSConnectionError, ConnectionTimeout) as exc:
            raise Unavailable(f"OpenSearch unreachable: {exc}") from exc
        except TransportError as exc:
            if isinstance(exc.status_code, int) and exc.status_code < 500 and \
                    exc.status_code != 429:
                raise NonRetryable(f"OpenSearch refused the batch: {exc}") from exc
            raise Retryable(f"OpenSearch error: {exc}") from exc
        except OpenSearchException as exc:
            raise Retryable(f"OpenSearch error: {exc}") from exc
        if result.get("errors"):
            self._raise_for_items(result["items"])

    @staticmethod
    def _raise_for_items(items: list[dict[str, Any]]) -> None:
        retryable, refused = [], []
        for item in items:
            outcome = item.get("index", {})
            status = outcome.get("status", 200)
            if status < 300 or status == 409:  # 409: a newer version is already indexed
                continue
            (retryable if status == 429 or status >= 500 else refused).append(
                f"{outcome.get('_id')}: {status} {outcome.get('error')}")
        if refused:
            raise NonRetryable("OpenSearch refused documents: " + "; ".join(refused[:5]))
        if retryable:
            raise Retryable("OpenSearch could not index now: " + "; ".join(retryable[:5]))


async def create_index(client: AsyncOpenSearch, index: str) -> None:
    """An index with kuromoji analysis, or cjk bigrams where the server lacks it."""
    for tokenizer in ("kuromoji_tokenizer", "standard"):
        try:
            await client.indices.create(index=index, body=index_body(tokenizer))
            return
        except RequestError as exc:
            if "resource_already_exists" in str(exc):
                return
            log.warning("index with %s analysis refused (%s); falling back", tokenizer, exc)
    raise NonRetryable(f"could not create index {index}")


async def ensure_index(client: AsyncOpenSearch, alias: str) -> str:
    """Create the first versioned index behind the alias if there is none. A name
    that already is an index (a rebuild's target, ADR 0005) is used as it is."""
    if await client.indices.exists(index=alias):  # an alias or an index
        return alias
    index = f"{alias}-v{INDEX_VERSION}"
    await create_index(client, index)
    try:
        await client.indices.put_alias(index=index, name=alias)
    except RequestError as exc:  # a concurrent worker created it
        log.info("alias %s: %s", alias, exc)
    return alias

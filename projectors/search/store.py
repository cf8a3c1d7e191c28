"""search-indexer: one OpenSearch document per workflow behind an alias.

Writes use external versioning with the aggregate version, so OpenSearch itself
refuses an older or repeated snapshot (409, which here means "already newer").
Japanese text is analysed with kuromoji where the server has it, cjk bigrams
otherwise; titles also get an English sub-field."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
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
from prometheus_client import Histogram

from contract import Applied, WorkflowSnapshot, workflow_of
from infra.retry import Backoff
from infra.telemetry import HOP_BUCKETS, observe_many
from projectors.projection import (
    Announcer,
    Delivery,
    NonRetryable,
    Retryable,
    Unavailable,
    newest_by_aggregate,
)

log = logging.getLogger("ringiflow.search")

ALIAS = "ringiflow-workflows"
INDEX_VERSION = 1

# The hop between the search indexer's bulk and a search that finds it: the wait for
# the refresh in flight, then its own (issue 14's breakdown).
REFRESH_DELAY = Histogram("ringiflow_search_refresh_delay_seconds",
                          "A document's bulk done to its refresh done (searchable), per "
                          "document", buckets=HOP_BUCKETS)


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


def document(snapshot: WorkflowSnapshot, tenant_id: str) -> dict[str, Any]:
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


class Refresher:
    """Makes what the live indexer indexed searchable, then announces it: one refresh
    at a time, in the background, each covering every bulk that finished before it
    started. A refresh per batch (the bulk's `refresh=true`) cost the real OpenSearch
    ~130 ms each under load, so at 25 commands/s the indexer fell behind refreshing
    batches of one; here refreshes coalesce as the rate grows, and an idle indexer
    still refreshes right after its bulk. Each refresh writes a Lucene segment, ~12 ms
    of OpenSearch's CPU however little it holds, so a busy indexer waits after one as
    long as it took (refreshing at most half the time: what a slow server needs, and
    nothing where refreshes are cheap) and `min_interval_s` after it began (ADR 0008)."""

    RETRY = Backoff(0.5, 5.0)
    CLOSE_WITHIN_S = 5.0

    def __init__(self, client: AsyncOpenSearch, alias: str, announce: Announcer,
                 min_interval_s: float = 0.0) -> None:
        self.client, self.alias, self.announce = client, alias, announce
        self.min_interval_s = min_interval_s
        self.started_at = -float("inf")  # when the last refresh began
        self.quiet_until = -float("inf")  # its end plus as long as it took
        self.pending: list[Applied] = []
        self.indexed_at: list[float] = []  # when each pending bulk finished, per document
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.closing = False

    def indexed(self, applied: list[Applied]) -> None:
        self.pending.extend(applied)
        self.indexed_at.extend([time.monotonic()] * len(applied))
        self.wake.set()
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        retries = self.RETRY.start()
        while True:
            await self.wake.wait()
            # An idle indexer's refresh starts at once, a busy one's spaced from the last.
            due = max(self.started_at + self.min_interval_s, self.quiet_until)
            if (delay := due - time.monotonic()) > 0 and not self.closing:
                await asyncio.sleep(delay)
            self.wake.clear()
            self.started_at = time.monotonic()
            covered, self.pending = self.pending, []
            since, self.indexed_at = self.indexed_at, []
            try:
                await self.client.indices.refresh(index=self.alias)
            except OpenSearchException as exc:  # indexed anyway: visible by the next refresh
                log.warning("refresh of %s failed (%s); trying again", self.alias, exc)
                self.pending[:0] = covered
                self.indexed_at[:0] = since
                self.wake.set()
                await asyncio.sleep(retries.next())
                continue
            retries.reset()
            now = time.monotonic()
            self.quiet_until = now + (now - self.started_at)
            observe_many(REFRESH_DELAY, [now - t for t in since])
            await self.announce(covered)
            if self.closing and not self.pending:
                return

    async def close(self) -> None:
        """Make what was indexed searchable and announce it, then stop (cut short
        after CLOSE_WITHIN_S: the index refreshes on its own schedule anyway)."""
        self.closing = True
        if self.task is not None and not self.task.done():
            self.wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self.task), self.CLOSE_WITHIN_S)
            except TimeoutError:
                self.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.task
        await self.announce.close()


class SearchStore:
    """`announcer`: the live indexer's; what it indexes is made searchable by a
    background :class:`Refresher` and announced there. Without one (a rebuild, tests)
    the index refreshes on its own schedule."""

    def __init__(self, opensearch_url: str, alias: str = ALIAS,
                 announcer: Announcer | None = None, refresh_interval_s: float = 0.0) -> None:
        self.client = AsyncOpenSearch(hosts=[opensearch_url], timeout=30, max_retries=0)
        self.alias = alias
        self.refresher = Refresher(self.client, alias, announcer, refresh_interval_s) \
            if announcer else None

    async def start(self) -> None:
        await ensure_index(self.client, self.alias)

    async def close(self) -> None:
        if self.refresher is not None:
            await self.refresher.close()
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
            body.append(document(workflow_of(e), str(e.tenant_id)))
        try:
            result = await self.client.bulk(body=body)
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
        if self.refresher is not None:
            self.refresher.indexed([(d.envelope.tenant_id, d.envelope.aggregate_id,
                                     d.envelope.version) for d in newest])

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

"""`ringiflow rebuild search-indexer`: blue/green. A new versioned index is built
from the events table (whatever Kafka still holds), caught up with events that
arrived meanwhile, and put behind the alias in one atomic alias update, so no
query ever sees an empty or missing index; the previous index is kept until
dropped. A crashed rebuild resumes into the index it left behind."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.rows import dict_row

from contract import EventEnvelope
from infra.clients import opensearch_client
from infra.settings import Settings, libpq_url
from projectors.projection import Delivery
from projectors.search_store import SearchStore, index_body

Progress = Callable[[str], None]
EVENTS = ("SELECT position, event_id, event_type, schema_version, aggregate_type, aggregate_id, "
          "version, occurred_at, payload, aggregate, metadata FROM event_store.events "
          "WHERE aggregate_type = 'workflow' AND position > %s ORDER BY position")


def _version(index: str) -> int:
    match = re.search(r"-v(\d+)$", index)
    return int(match.group(1)) if match else 0


async def rebuild_search(settings: Settings, dry_run: bool, drop_old: bool,
                         progress: Progress, batch: int = 1000) -> dict[str, Any]:
    alias = settings.search_alias
    client = opensearch_client(settings.require("opensearch_url"))
    try:
        live = list(await client.indices.get_alias(name=alias)) \
            if await client.indices.exists_alias(name=alias) else []
        existing = [i for i in await client.indices.get(index=f"{alias}-v*")] \
            if await client.indices.exists(index=f"{alias}-v*") else []
        with psycopg.connect(libpq_url(settings.require("database_url"))) as conn:
            total = conn.execute("SELECT count(*) FROM event_store.events "
                                 "WHERE aggregate_type = 'workflow'").fetchone()[0]  # type: ignore[index]
        newest = max([_version(i) for i in existing] or [0])
        leftover = [i for i in existing if _version(i) == newest and i not in live]
        target = leftover[0] if leftover else f"{alias}-v{newest + 1}"
        plan = {"alias": alias, "live": live, "target": target, "resume": bool(leftover),
                "events": total}
        if dry_run:
            return plan
        if not leftover:
            for tokenizer in ("kuromoji_tokenizer", "standard"):
                try:
                    await client.indices.create(index=target, body=index_body(tokenizer))
                    break
                except Exception as exc:
                    progress(f"{tokenizer} analysis refused ({exc}); falling back")
        store = SearchStore(settings.require("opensearch_url"), alias=target)
        try:
            position = await _copy(settings, store, 0, total, progress, batch)
            position = await _copy(settings, store, position, total, progress, batch)
            await client.indices.refresh(index=target)
            actions: list[dict[str, Any]] = [{"remove": {"index": i, "alias": alias}}
                                             for i in live]
            actions.append({"add": {"index": target, "alias": alias}})
            await client.indices.update_aliases(body={"actions": actions})
            # Events the live indexer wrote to the old index just before the swap.
            await _copy(settings, store, position, total, progress, batch)
        finally:
            await store.close()
        dropped = []
        if drop_old:
            for index in existing:
                if index != target:
                    await client.indices.delete(index=index)
                    dropped.append(index)
        return {**plan, "swapped_from": live, "kept": [i for i in existing
                                                       if i != target and i not in dropped],
                "dropped": dropped}
    finally:
        await client.close()


async def _copy(settings: Settings, store: SearchStore, after: int, total: int,
                progress: Progress, batch: int) -> int:
    started, done, position = time.monotonic(), 0, after
    with psycopg.connect(libpq_url(settings.require("database_url")),
                         row_factory=dict_row) as conn:
        cur = conn.cursor(name="rebuild")
        cur.execute(EVENTS, (after,))
        while rows := cur.fetchmany(batch):
            position = rows[-1]["position"]
            await store.apply([Delivery(EventEnvelope.model_validate(
                {k: v for k, v in r.items() if k != "position"}), replay=True) for r in rows])
            done += len(rows)
            rate = done / max(time.monotonic() - started, 1e-6)
            left = max(total - after - done, 0)
            progress(f"{done} events indexed, {rate:,.0f}/s, ETA {left / rate:.0f} s")
    return position


def rebuild(settings: Settings, projector: str, dry_run: bool, drop_old: bool,
            progress: Progress) -> dict[str, Any]:
    if projector != "search-indexer":
        raise ValueError(f"rebuild covers search-indexer so far; for {projector} use "
                         "`ringiflow replay` per tenant")
    return asyncio.run(rebuild_search(settings, dry_run, drop_old, progress))

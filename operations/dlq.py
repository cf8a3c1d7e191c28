"""Triage of the sequenced dead-letter queues (`ringiflow dlq`, the console).

Parked aggregates come from streams.parked_aggregates; the records themselves
from each group's `<group>.dlq` topic. Every retry and discard is written to
the operator audit trail (operations.audit)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
import psycopg
from psycopg.rows import dict_row

from contract import CONSUMER_GROUPS, dlq_topic
from infra import tracing
from infra.kafka import read_from_start
from infra.settings import ConfigError, Settings, libpq_url
from operations.audit import record_action


@dataclass(frozen=True)
class Filters:
    group: str | None = None
    error_class: str | None = None
    aggregate: UUID | None = None
    event_type: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def check_group(group: str) -> str:
    """`group` if it is a consumer group of the catalogue; else a ConfigError
    naming the known ones (a typo must not read as "nothing parked")."""
    if group not in CONSUMER_GROUPS:
        raise ConfigError(f"unknown consumer group {group!r}; the known groups are "
                          f"{', '.join(CONSUMER_GROUPS)}")
    return group


def parked(settings: Settings, filters: Filters) -> list[dict[str, Any]]:
    query = ("SELECT consumer_group, aggregate_id, tenant_id, aggregate_type, first_event_id, "
             "first_version, last_version, parked_events, error_class, error_message, "
             "parked_at, updated_at FROM streams.parked_aggregates WHERE true")
    params: list[Any] = []
    for column, value in (("consumer_group", filters.group),
                          ("error_class", filters.error_class),
                          ("aggregate_id", filters.aggregate)):
        if value is not None:
            query += f" AND {column} = %s"
            params.append(value)
    if filters.since:
        query += " AND parked_at >= %s"
        params.append(filters.since)
    if filters.until:
        query += " AND parked_at < %s"
        params.append(filters.until)
    with psycopg.connect(libpq_url(settings.require("database_url")),
                         row_factory=dict_row) as conn:
        return conn.execute(query + " ORDER BY parked_at", params).fetchall()


def records(settings: Settings, filters: Filters) -> list[dict[str, Any]]:
    """DLQ records as dicts: context headers, original coordinates, the event."""
    groups = [filters.group] if filters.group else list(CONSUMER_GROUPS)
    bootstrap = settings.require("kafka_bootstrap")

    async def read_all() -> list[list[Any]]:  # every group's DLQ topic at once
        return await asyncio.gather(*(read_from_start(bootstrap, dlq_topic(group).name)
                                      for group in groups))

    out = []
    for group, messages in zip(groups, asyncio.run(read_all()), strict=True):
        for message in messages:
            headers = {k: v.decode(errors="replace") for k, v in message.headers}
            try:
                event: Any = orjson.loads(message.value) if message.value else None
            except orjson.JSONDecodeError:
                event = None
            row = {
                "group": group, "dlq_partition": message.partition, "dlq_offset": message.offset,
                "reason": headers.get("dlq.reason"), "error_class": headers.get("dlq.error.class"),
                "error_message": headers.get("dlq.error.message"),
                "stack": headers.get("dlq.error.stack"), "attempts": headers.get("dlq.attempts"),
                "first_failure": headers.get("dlq.first_failure"),
                "last_failure": headers.get("dlq.last_failure"),
                "parked_behind": headers.get("dlq.parked_behind"),
                "original": {"topic": headers.get("dlq.original.topic"),
                             "partition": headers.get("dlq.original.partition"),
                             "offset": headers.get("dlq.original.offset")},
                "aggregate_id": headers.get("aggregate_id"),
                "tenant_id": headers.get("tenant_id"),
                "event_type": headers.get("event_type"), "version": headers.get("version"),
                "event_id": headers.get("event_id"),
                "event": event if isinstance(event, dict) else None,
                "raw": None if isinstance(event, dict) else (message.value or b"").decode(
                    errors="replace"),
            }
            if _matches(row, filters):
                out.append(row)
    return out


def summary(settings: Settings, filters: Filters) -> list[dict[str, Any]]:
    """Every group's dead letters, counted: how many, how many hold back an aggregate
    (parked) and how many belong to none (an unreadable record, a notification), the
    oldest and newest, and the error classes. Groups without any are left out."""
    by_group: dict[str, dict[str, Any]] = {}
    for row in records(settings, filters):
        group = by_group.setdefault(row["group"], {
            "group": row["group"], "records": 0, "parked": 0, "without_aggregate": 0,
            "oldest": None, "newest": None, "error_classes": {}})
        group["records"] += 1
        group["parked"] += row["reason"] == "parked"
        group["without_aggregate"] += not row["aggregate_id"]
        when = row["first_failure"]
        if when:
            group["oldest"] = min(filter(None, (group["oldest"], when)))
            group["newest"] = max(filter(None, (group["newest"], when)))
        kind = row["error_class"] or "unknown"
        group["error_classes"][kind] = group["error_classes"].get(kind, 0) + 1
    return [by_group[g] for g in CONSUMER_GROUPS if g in by_group]


def _matches(row: dict[str, Any], f: Filters) -> bool:
    if f.error_class and row["error_class"] != f.error_class:
        return False
    if f.aggregate and row["aggregate_id"] != str(f.aggregate):
        return False
    if f.event_type and row["event_type"] != f.event_type:
        return False
    when = row["last_failure"]
    if when and (f.since or f.until):
        at = datetime.fromisoformat(when)
        if (f.since and at < f.since) or (f.until and at >= f.until):
            return False
    return True


def retry(settings: Settings, group: str, aggregate: UUID, tenant: UUID,
          operator: str | None = None) -> dict[str, Any]:
    """Re-drive one tenant's parked aggregate through its projection's store, in order."""
    from psycopg_pool import AsyncConnectionPool

    from projectors.catalogue import CATALOGUE
    from streams.deadletters import DeadLetters, redrive

    async def run() -> dict[str, Any]:
        projection = CATALOGUE[group](settings)
        await projection.store.start()
        async with AsyncConnectionPool(libpq_url(settings.require("database_url")),
                                       min_size=1, max_size=2) as pool:
            try:
                result = await redrive(DeadLetters(group, settings.require("kafka_bootstrap"),
                                                   pool), projection.store, tenant, aggregate,
                                       settings.require("kafka_bootstrap"))
            finally:
                await projection.store.close()
        return {"aggregate_id": str(aggregate), "applied": result.applied,
                "released": result.released, "error": result.error}

    tracing.setup("cli")  # a traced re-drive continues each event's trace
    try:
        outcome = asyncio.run(run())
    finally:
        tracing.flush()
    record_action(settings, "dlq.retry", group, aggregate,
                  "released" if outcome["released"] else "still_parked", details=outcome,
                  operator=operator)
    return outcome


def discard(settings: Settings, group: str, aggregate: UUID, reason: str,
            operator: str | None = None) -> bool:
    """Release an aggregate without applying its dead letters (they stay in the
    DLQ topic for the record)."""
    with psycopg.connect(libpq_url(settings.require("database_url")), autocommit=True) as conn:
        gone = conn.execute("DELETE FROM streams.parked_aggregates WHERE consumer_group = %s "
                            "AND aggregate_id = %s", (group, aggregate)).rowcount
    record_action(settings, "dlq.discard", group, aggregate,
                  "released" if gone else "not_parked", reason=reason, operator=operator)
    return bool(gone)

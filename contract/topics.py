"""The topic catalogue (created explicitly: broker auto-create is off): partitions,
retention and key of every topic, and one consumer group per projection with its
dead-letter topic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from contract.envelope import AggregateType

DAY_MS = 24 * 60 * 60 * 1000
# PostgreSQL NOTIFY channel that wakes relays when outbox rows are appended (ADR 0014).
OUTBOX_NOTIFY_CHANNEL = "ringiflow_outbox"


@dataclass(frozen=True)
class Topic:
    name: str
    partitions: int
    retention_ms: int
    cleanup_policy: Literal["delete", "compact", "compact,delete"] = "delete"
    key: str = "aggregate_id"

    def config(self) -> dict[str, str]:
        return {"retention.ms": str(self.retention_ms), "cleanup.policy": self.cleanup_policy}


def events_topic_name(aggregate_type: AggregateType | str) -> str:
    return f"ringiflow.{AggregateType(aggregate_type).value}.events"


WORKFLOW_EVENTS = Topic(events_topic_name(AggregateType.WORKFLOW), 12, 7 * DAY_MS)
# Compaction would keep only the newest event per aggregate, and projectors need
# every event; so these keep 7 days and the events table keeps everything.
DEFINITION_EVENTS = Topic(events_topic_name(AggregateType.DEFINITION), 3, 7 * DAY_MS)
USER_EVENTS = Topic(events_topic_name(AggregateType.USER), 3, 7 * DAY_MS)
AUDIT_EVENTS = Topic("ringiflow.audit.events", 12, 30 * DAY_MS, key="tenant_id")
NOTIFICATION_COMMANDS = Topic("ringiflow.notification.commands", 6, DAY_MS, key="user_id")

TOPICS: tuple[Topic, ...] = (
    WORKFLOW_EVENTS,
    DEFINITION_EVENTS,
    USER_EVENTS,
    AUDIT_EVENTS,
    NOTIFICATION_COMMANDS,
)

# One consumer group per projection, each with its own offsets, lag and DLQ.
CONSUMER_GROUPS: tuple[str, ...] = (
    "workflow-projector",
    "cache-projector",
    "search-indexer",
    "audit-processor",
    "notification-processor",
    "notification-dispatcher",
    "workflow-completion-saga",
)


def dlq_topic(group: str) -> Topic:
    return Topic(f"{group}.dlq", 3, 30 * DAY_MS)


def all_topics() -> tuple[Topic, ...]:
    return TOPICS + tuple(dlq_topic(g) for g in CONSUMER_GROUPS)

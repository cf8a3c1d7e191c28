"""Every projection RingiFlow runs, declared as data: its consumer group, the
topics and event types it reads, and the store it writes."""

from __future__ import annotations

from collections.abc import Callable

from contract import (
    DEFINITION_EVENTS,
    REGISTRY,
    USER_EVENTS,
    WORKFLOW_EVENTS,
    AggregateType,
)
from infra.settings import Settings, libpq_url
from projectors.cache_store import CacheStore
from projectors.derived import DerivedTopicStore, audit_records, notification_records
from projectors.projection import Announcer, Projection
from projectors.search_store import SearchStore
from projectors.workflow_store import WorkflowStore

ALL_EVENTS = (WORKFLOW_EVENTS.name, DEFINITION_EVENTS.name, USER_EVENTS.name)
WORKFLOW_AND_USERS = frozenset(REGISTRY.names(AggregateType.WORKFLOW)
                               + REGISTRY.names(AggregateType.USER))
NOTIFYING = frozenset({"WorkflowStepAssigned", "WorkflowApproved", "WorkflowRejected",
                       "WorkflowStepCompleted"})

ProjectionFactory = Callable[[Settings], Projection]

CATALOGUE: dict[str, ProjectionFactory] = {
    "workflow-projector": lambda s: Projection(
        "workflow-projector", ALL_EVENTS, None,
        WorkflowStore(libpq_url(s.role_database_url("projector")))),
    "cache-projector": lambda s: Projection(
        "cache-projector", (WORKFLOW_EVENTS.name, USER_EVENTS.name), WORKFLOW_AND_USERS,
        CacheStore(s.require("redis_url"))),
    "search-indexer": lambda s: Projection(
        "search-indexer", (WORKFLOW_EVENTS.name,), None,
        SearchStore(s.require("opensearch_url"), s.search_alias,
                    announcer=Announcer(libpq_url(s.role_database_url("projector")), "search"))),
    "audit-processor": lambda s: Projection(
        "audit-processor", ALL_EVENTS, None,
        DerivedTopicStore(s.require("kafka_bootstrap"), audit_records, side_effect=False)),
    "notification-processor": lambda s: Projection(
        "notification-processor", (WORKFLOW_EVENTS.name,), NOTIFYING,
        DerivedTopicStore(s.require("kafka_bootstrap"), notification_records, side_effect=True,
                          on_replay=s.replay_notifications)),
}

"""Every projection RingiFlow runs, declared as data: its consumer group, the topics
and event types it reads, the store it writes and, for a read model, the versioned
store that rebuilds, verifies and repairs it (operations look it up here)."""

from __future__ import annotations

from collections.abc import Callable

from contract import (
    DEFINITION_EVENTS,
    REGISTRY,
    USER_EVENTS,
    WORKFLOW_EVENTS,
    AggregateType,
    EventName,
)
from infra.settings import Settings, libpq_url
from projectors.cache.store import CacheStore
from projectors.cache.versions import CacheVersions
from projectors.derived import DerivedTopicStore, audit_records, notification_records
from projectors.projection import Announcer, Projection
from projectors.search.store import SearchStore
from projectors.search.versions import SearchVersions
from projectors.versioned import VersionedStore
from projectors.workflows.store import WorkflowStore
from projectors.workflows.versions import TableVersions

ALL_EVENTS = (WORKFLOW_EVENTS.name, DEFINITION_EVENTS.name, USER_EVENTS.name)
WORKFLOW_AND_USERS = frozenset(REGISTRY.names(AggregateType.WORKFLOW)
                               + REGISTRY.names(AggregateType.USER))
NOTIFYING = frozenset({EventName.WORKFLOW_STEP_ASSIGNED, EventName.WORKFLOW_APPROVED,
                       EventName.WORKFLOW_REJECTED, EventName.WORKFLOW_STEP_COMPLETED})

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
                    announcer=Announcer(libpq_url(s.role_database_url("projector")), "search"),
                    refresh_interval_s=s.search_refresh_interval_ms / 1000)),
    "audit-processor": lambda s: Projection(
        "audit-processor", ALL_EVENTS, None,
        DerivedTopicStore(s.require("kafka_bootstrap"), audit_records, side_effect=False)),
    "notification-processor": lambda s: Projection(
        "notification-processor", (WORKFLOW_EVENTS.name,), NOTIFYING,
        DerivedTopicStore(s.require("kafka_bootstrap"), notification_records, side_effect=True,
                          on_replay=s.replay_notifications)),
}


def versioned(group: str) -> type[VersionedStore] | None:
    """The versioned store of `group`'s read model; None for a projection that writes
    topics (or for an unknown group)."""
    return VERSIONED.get(group)


# Each read model's versioned store, by projection (the projections above that write
# topics have none).
VERSIONED: dict[str, type[VersionedStore]] = {
    TableVersions.projector: TableVersions, CacheVersions.projector: CacheVersions,
    SearchVersions.projector: SearchVersions,
}


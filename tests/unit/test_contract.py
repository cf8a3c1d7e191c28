"""The event contract: envelope rules, codec round trip, headers, upcasting,
and the topic catalogue."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

import pytest
from pydantic import ValidationError

import contract
from contract import (
    AggregateType,
    EventEnvelope,
    EventMetadata,
    EventRegistry,
    EventType,
    UndecodableRecord,
    UnknownEventType,
    UnsupportedSchemaVersion,
)


def envelope(**overrides: object) -> EventEnvelope:
    fields: dict[str, object] = {
        "event_type": "WorkflowCreated",
        "aggregate_type": "workflow",
        "aggregate_id": uuid4(),
        "version": 1,
        "occurred_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "payload": {"title": "稟議: 新しいノートPC"},
        "aggregate": {"status": "draft"},
        "metadata": EventMetadata(tenant_id=uuid4(), user_id=uuid4(), correlation_id=uuid4(),
                                  causation_id=uuid4(), trace_id=contract.new_trace_id()),
    }
    fields.update(overrides)
    return EventEnvelope(**fields)  # type: ignore[arg-type]


def test_record_round_trips_and_is_keyed_by_aggregate() -> None:
    event = envelope()
    record = contract.to_record(event)
    assert record.topic == "ringiflow.workflow.events"
    assert record.key == str(event.aggregate_id).encode()
    assert contract.decode_envelope(record.value) == event
    assert "稟議" in record.value.decode()


def test_headers_carry_routing_fields_and_w3c_traceparent() -> None:
    event = envelope()
    record = contract.to_record(event)
    for name in ("event_id", "event_type", "aggregate_type", "version", "tenant_id",
                 "correlation_id", "traceparent"):
        assert record.header(name), name
    assert record.header("version") == "1"
    assert record.header("tenant_id") == str(event.metadata.tenant_id)
    trace_id, _span = contract.parse_traceparent(record.header("traceparent") or "")
    assert trace_id == event.metadata.trace_id
    # Re-publishing the same event yields the same parent span.
    assert contract.to_record(event).header("traceparent") == record.header("traceparent")


@pytest.mark.parametrize("bad", [
    {"version": 0},
    {"occurred_at": datetime(2026, 1, 1)},  # naive
    {"aggregate_type": "invoice"},
    {"event_type": ""},
])
def test_envelope_rejects_invalid_fields(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        envelope(**bad)


def test_envelope_rejects_unknown_fields() -> None:
    data = envelope().model_dump(mode="json")
    data["surprise"] = 1
    with pytest.raises(UndecodableRecord):
        contract.decode_envelope(data)


@pytest.mark.parametrize("raw", [b"\xff\xfe not json", b"{}", b"[1,2]", None, b'{"event_id": 1}'])
def test_undecodable_records_raise_a_non_retryable_error(raw: bytes | None) -> None:
    with pytest.raises(UndecodableRecord):
        contract.decode_envelope(raw)


def test_unknown_event_type_is_refused_by_name() -> None:
    with pytest.raises(UnknownEventType, match="WorkflowTeleported"):
        contract.decode_envelope(envelope(event_type="WorkflowTeleported").model_dump_json())


def test_upcasters_bring_old_payloads_to_the_current_schema() -> None:
    registry = EventRegistry()
    registry.register(EventType("ThingHappened", AggregateType.WORKFLOW, schema_version=3))

    @registry.upcaster("ThingHappened", 1)
    def v1_to_v2(payload: dict) -> dict:
        return {**payload, "priority": payload.get("priority", "medium")}

    @registry.upcaster("ThingHappened", 2)
    def v2_to_v3(payload: dict) -> dict:
        payload["name"] = payload.pop("title")
        return payload

    old = envelope(event_type="ThingHappened", schema_version=1, payload={"title": "x"})
    new = contract.decode_envelope(old.model_dump_json(), registry)
    assert new.schema_version == 3
    assert new.payload == {"name": "x", "priority": "medium"}
    assert old.payload == {"title": "x"}  # the stored event is untouched


def test_a_newer_schema_version_than_the_code_knows_is_refused() -> None:
    future = envelope(schema_version=2)
    with pytest.raises(UnsupportedSchemaVersion, match="upgrade this consumer"):
        contract.decode_envelope(future.model_dump_json())


def test_missing_upcaster_is_reported() -> None:
    registry = EventRegistry()
    registry.register(EventType("ThingHappened", AggregateType.WORKFLOW, schema_version=2))
    with pytest.raises(UnsupportedSchemaVersion, match="no upcaster"):
        registry.upcast(envelope(event_type="ThingHappened", schema_version=1))


def test_registering_a_type_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="twice"):
        contract.REGISTRY.register(EventType("WorkflowCreated", AggregateType.WORKFLOW))


def test_topic_catalogue_matches_the_spec() -> None:
    by_name = {t.name: t for t in contract.all_topics()}
    day = contract.DAY_MS
    expected = {
        "ringiflow.workflow.events": (12, 7 * day),
        "ringiflow.definition.events": (3, 7 * day),
        "ringiflow.user.events": (3, 7 * day),
        "ringiflow.audit.events": (12, 30 * day),
        "ringiflow.notification.commands": (6, day),
    }
    for name, (partitions, retention) in expected.items():
        assert (by_name[name].partitions, by_name[name].retention_ms) == (partitions, retention)
    for group in contract.CONSUMER_GROUPS:
        dlq = by_name[f"{group}.dlq"]
        assert (dlq.partitions, dlq.retention_ms) == (3, 30 * day)
    assert by_name["ringiflow.audit.events"].key == "tenant_id"
    assert by_name["ringiflow.notification.commands"].key == "user_id"


def test_every_aggregate_type_has_registered_events() -> None:
    for aggregate_type in AggregateType:
        assert contract.REGISTRY.names(aggregate_type)


@pytest.mark.parametrize("value", ["", "00-abc-def-01", "00-" + "0" * 32 + "-" + "1" * 16 + "-01",
                                   "00-" + "g" * 32 + "-" + "1" * 16 + "-01"])
def test_malformed_traceparent_is_rejected(value: str) -> None:
    with pytest.raises(ValueError):
        contract.parse_traceparent(value)


@pytest.mark.parametrize("occurred_at", [datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
                                         datetime(2026, 1, 2, 3, 4, 5, 120, tzinfo=UTC)])
@pytest.mark.parametrize("metadata", [
    EventMetadata(tenant_id=uuid4(), user_id=uuid4(), correlation_id=uuid4(),
                  causation_id=uuid4(), trace_id=contract.new_trace_id()),
    EventMetadata(tenant_id=uuid4(), correlation_id=uuid4(), is_reconstructed=True),
])
def test_envelope_json_is_what_pydantic_writes(occurred_at: datetime,
                                               metadata: EventMetadata) -> None:
    """The append path writes envelopes with `envelope_json`; the stored and
    published JSON must stay the model's own."""
    one = envelope(occurred_at=occurred_at, metadata=metadata,
                   payload={"steps": [{"name": "課長", "due": None}], "n": 3, "ok": True},
                   aggregate={"comments": [], "title": "稟議 \"引用\" \\ 改行\n"})
    assert contract.envelope_json(one) == one.model_dump(mode="json")


def test_envelope_json_of_every_event_a_workflow_lives_through() -> None:
    """The real payloads and snapshots: a workflow created, commented, documented,
    submitted, approved at both steps."""
    from commands import domain
    from commands.domain.workflow.decide import step_id_of
    from commands.service import CommandContext, envelopes_for
    from infra.auth import Principal

    tenant, initiator, a1, a2 = uuid4(), uuid4(), uuid4(), uuid4()
    workflow = uuid4()
    state = domain.initial_state("workflow", workflow)
    due = datetime(2099, 1, 1, tzinfo=UTC)
    commands = [
        (initiator, domain.CreateWorkflow(
            uuid4(), "稟議", (domain.ResolvedStep("課長", a1, "一"),
                            domain.ResolvedStep("部長", a2, "二")),
            "ノートPC", description="説明", due_date=due)),
        (initiator, domain.AddComment("コメント")),
        (initiator, domain.AttachDocument(uuid4(), "見積.pdf", "application/pdf", 1024,
                                          "a" * 64, None)),
        (initiator, domain.SubmitWorkflow()),
        (a1, domain.ApproveStep(step_id_of(workflow, 1), "可")),
        (a2, domain.ApproveStep(step_id_of(workflow, 2), None)),
    ]
    checked = 0
    for user, command in commands:
        actor = domain.Actor(user, "利用者", ("user",))
        events = domain.decide(command, state, actor, datetime.now(UTC))
        ctx = CommandContext(Principal(tenant, user, "利用者", ("user",)), uuid4(), uuid4(),
                             contract.new_trace_id(), None, None, "")
        envelopes, state = envelopes_for(state, events, ctx)
        for one in envelopes:
            assert contract.envelope_json(one) == one.model_dump(mode="json"), one.event_type
            checked += 1
    assert checked >= 9 and state.status == "approved"

"""The published contract (contract.schemas) says what the code writes: every event of
a realistic history validates against its event type's JSON Schema, a malformed one
does not, and the AsyncAPI document is valid AsyncAPI 3.0.0 naming every topic with its
key, partitions and retention."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from uuid import uuid4

import jsonschema
import pytest

from commands import domain
from contract import EVENTS, TOPICS, all_topics
from contract.schemas import asyncapi, event_schemas
from tests.scenarios import build_world

ASYNCAPI_SCHEMA = Path(__file__).parent.parent / "data" / "asyncapi-3.0.0.schema.json"


@functools.cache
def validator(event_type: str) -> jsonschema.Draft202012Validator:
    schema = event_schemas()[event_type]
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def test_every_event_of_a_history_matches_its_schema() -> None:
    world = build_world(workflows=40)
    draft = next(s for s in world.states.values()
                 if isinstance(s, domain.WorkflowState) and s.status == "draft")
    assert draft.initiator_id is not None
    world.run(domain.Actor(draft.initiator_id, draft.initiator_name),
              domain.AttachDocument(uuid4(), "見積書.pdf", "application/pdf", 1234, "a" * 64,
                                    "https://files.example/q/1"), draft.id)
    seen = set()
    for envelope in world.events:
        document = json.loads(envelope.model_dump_json())
        errors = list(validator(envelope.event_type).iter_errors(document))
        assert not errors, f"{envelope.event_type}: {[e.message for e in errors[:3]]}"
        seen.add(envelope.event_type)
    assert seen == {name.value for name in EVENTS}, "the history covers every event type"


@pytest.mark.parametrize("breakage", ["missing payload field", "wrong snapshot type",
                                      "unknown status", "another event type"])
def test_a_malformed_event_is_refused(breakage: str) -> None:
    envelope = next(e for e in build_world(workflows=2).events
                    if e.event_type == "WorkflowStepAssigned")
    document = json.loads(envelope.model_dump_json())
    if breakage == "missing payload field":
        del document["payload"]["assignee_id"]
    elif breakage == "wrong snapshot type":
        document["aggregate"]["version"] = "three"
    elif breakage == "unknown status":
        document["aggregate"]["status"] = "lost"
    else:
        document["event_type"] = "WorkflowApproved"
    assert list(validator("WorkflowStepAssigned").iter_errors(document))


def test_the_asyncapi_document_is_valid_and_names_every_topic() -> None:
    document = asyncapi()
    schema = json.loads(ASYNCAPI_SCHEMA.read_text())
    jsonschema.Draft7Validator(schema).validate(document)
    addresses = {c["address"]: c for c in document["channels"].values()}
    assert set(addresses) == {t.name for t in all_topics()}
    for topic in TOPICS:
        binding = addresses[topic.name]["bindings"]["kafka"]
        assert (binding["partitions"], binding["topicConfiguration"]["retention.ms"]) == \
            (topic.partitions, topic.retention_ms)
    workflow = addresses["ringiflow.workflow.events"]
    assert "aggregate_id" in document["components"]["messages"]["WorkflowApproved"][
        "bindings"]["kafka"]["key"]["description"]
    assert set(workflow["messages"]) >= {"WorkflowCreated", "WorkflowApproved"}

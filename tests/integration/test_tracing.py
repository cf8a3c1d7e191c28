"""One connected trace per command, across every process (issue 14, ADR 0008).

The whole system runs with the standard OTEL_* variables pointing at an OTLP/HTTP
receiver held in memory by this test; each assertion reads the spans the real
processes exported: the command API's request and append, the relay's send, every
consumer group's process span and its store writes, derived records, a query's
consistency wait, and a DLQ re-drive by the CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from uuid import uuid4

import httpx
import psycopg
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from contract import AUDIT_EVENTS, events_topic_name, traceparent
from infra.settings import Settings, libpq_url
from projectors.catalogue import CATALOGUE
from tests.conftest import TEST_JWT_SECRET, component, settings_env
from tests.helpers import Person, Tenant

pytestmark = pytest.mark.slow
WORKFLOWS = events_topic_name("workflow")
USERS = events_topic_name("user")


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent: str
    kind: int
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...]


class Collector:
    """An OTLP/HTTP trace receiver whose exporter is this list."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    service = next((a.value.string_value for a in resource.resource.attributes
                                    if a.key == "service.name"), "")
                    for scope in resource.scope_spans:
                        collector.spans += [Span(
                            service, s.name, s.trace_id.hex(), s.span_id.hex(),
                            s.parent_span_id.hex(), s.kind,
                            {a.key: getattr(a.value, a.value.WhichOneof("value"))
                             for a in s.attributes if a.value.WhichOneof("value")},
                            tuple((link.trace_id.hex(), link.span_id.hex())
                                  for link in s.links)) for s in scope.spans]
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def env(self) -> dict[str, str]:
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": self.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}

    async def wait_for(self, what: str, found: Callable[[list[Span]], bool],
                       timeout_s: float = 60) -> list[Span]:
        def holds() -> bool:
            try:
                return found(self.spans)
            except AssertionError:  # a span it needs has not arrived yet
                return False

        deadline = time.monotonic() + timeout_s
        while not holds():
            assert time.monotonic() < deadline, f"no {what} among {len(self.spans)} spans: " \
                + ", ".join(sorted({f'{s.service}:{s.name}' for s in self.spans}))
            await asyncio.sleep(0.2)
        return list(self.spans)


@pytest.fixture(scope="module")
def traced(isolated: Settings) -> Iterator[tuple[dict[str, str], Collector]]:
    collector = Collector()
    env = collector.env()
    with component("command-api", isolated, "RINGIFLOW_COMMAND_API_PORT", **env) as commands, \
            component("relay", isolated, "RINGIFLOW_RELAY_PORT", **env), \
            component("workers", isolated, "RINGIFLOW_WORKERS_PORT", **env) as workers, \
            component("query-api", isolated, "RINGIFLOW_QUERY_API_PORT", **env) as queries:
        deadline = time.monotonic() + 60
        while httpx.get(workers + "/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        yield {"commands": commands, "queries": queries}, collector
    collector.server.shutdown()


def of_trace(spans: list[Span], trace_id: str) -> list[Span]:
    return [s for s in spans if s.trace_id == trace_id]


def processing(spans: list[Span], group: str, send: Span) -> Span | None:
    """The group's process span that applied the event `send` sent."""
    found = [s for s in spans if s.kind == 5 and (send.trace_id, send.span_id) in s.links
             and s.attributes.get("messaging.consumer.group.name") == group]
    return found[0] if len(found) == 1 else None


def writing(spans: list[Span], group: str, send: Span) -> Span:
    process = processing(spans, group, send)
    assert process is not None, group
    return one([s for s in spans if s.trace_id == process.trace_id], name=f"write {group}",
               parent=process.span_id)


def one(spans: list[Span], **match: Any) -> Span:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, [(s.service, s.name) for s in spans])
    return found[0]


async def test_one_command_is_one_trace_from_request_to_every_read_model_and_the_query(
        traced: tuple[dict[str, str], Collector], isolated: Settings) -> None:
    urls, collector = traced
    trace_id = uuid4().hex
    async with httpx.AsyncClient(base_url=urls["commands"], timeout=30) as client:
        tenant = await Tenant(client, TEST_JWT_SECRET, isolated.database_url or "").setup()
        created = await tenant.ok(tenant.initiator, "/workflows", {
            "definition_id": str(tenant.definition_id), "title": "トレース付き"},
            traceparent=traceparent(trace_id))
    async with httpx.AsyncClient(base_url=urls["queries"], timeout=30) as client:
        read = await client.get("/api/v1/queries/workflows?limit=5", headers={
            **tenant.headers(tenant.initiator),
            "X-Consistency-Token": created["consistency_token"]})
    assert read.headers["X-Consistency"] == "reached"

    groups = [g for g in CATALOGUE if WORKFLOWS in CATALOGUE[g](isolated).topics]
    spans = await collector.wait_for("the relay's send", lambda spans: any(
        s.name == f"send {WORKFLOWS}" for s in of_trace(spans, trace_id)))
    send = one(of_trace(spans, trace_id), name=f"send {WORKFLOWS}")
    # A batch may hold other events too: its process span is then in a trace of its
    # own, linked to the send span of every event it applied.
    spans = await collector.wait_for("process span of every group", lambda spans: all(
        processing(spans, group, send) for group in groups))
    spans = await collector.wait_for("derived audit record", lambda spans: any(
        s.name == f"send {AUDIT_EVENTS.name}" and s.service.endswith("audit-processor")
        and s.parent == writing(spans, "audit-processor", send).span_id for s in spans))
    spans = await collector.wait_for("consistency wait", lambda spans: any(
        s.name == "consistency wait workflow_list" for s in spans))
    mine = of_trace(spans, trace_id)

    request = one(mine, service="ringiflow-command-api", kind=2,  # SERVER
                  name="POST /api/v1/commands/workflows")
    append = one(mine, name="append workflow")
    assert append.parent == request.span_id
    assert send.service == "ringiflow-relay" and send.parent == append.span_id
    assert send.kind == 4  # PRODUCER
    assert send.attributes["messaging.system"] == "kafka"
    assert send.attributes["messaging.destination.name"] == WORKFLOWS
    assert send.attributes["messaging.kafka.message.key"] == created["aggregate_id"]
    assert "messaging.destination.partition.id" in send.attributes
    assert "messaging.kafka.offset" in send.attributes

    for group in groups:
        process = processing(spans, group, send)
        assert process is not None and process.service == f"ringiflow-worker-{group}"
        assert process.kind == 5 and WORKFLOWS in process.name  # CONSUMER
        assert process.attributes["messaging.system"] == "kafka"
        if process.attributes["messaging.batch.message_count"] == 1:
            assert process.parent == send.span_id  # one event: the send's child
        if CATALOGUE[group](isolated).handles("WorkflowCreated"):
            writing(spans, group, send)
    workflow_write = writing(spans, "workflow-projector", send)
    assert any(s.parent == workflow_write.span_id and s.trace_id == workflow_write.trace_id
               for s in spans), "the PostgreSQL writes are not in the trace"
    cache_write = writing(spans, "cache-projector", send)
    assert any(s.parent == cache_write.span_id for s in spans), "no Redis spans"

    # The query ran in the reader's trace, linked to the command's.
    wait = next(s for s in spans if s.name == "consistency wait workflow_list"
                and s.attributes.get("ringiflow.aggregate_id") == created["aggregate_id"])
    assert wait.service == "ringiflow-query-api"
    assert wait.attributes["ringiflow.consistency"] == "reached"
    assert any(link[0] == trace_id for link in wait.links)


async def test_a_dlq_redrive_continues_the_trace_of_the_command(
        traced: tuple[dict[str, str], Collector], isolated: Settings) -> None:
    urls, collector = traced
    tenant_id, user = uuid4(), uuid4()
    admin = Person(tenant_id, "管理者", ["admin"])
    # The user's stream is parked in workflow-projector before it exists, so its first
    # event goes to the DLQ (with the send span's traceparent) instead of the store.
    with psycopg.connect(libpq_url(isolated.database_url or ""), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO streams.parked_aggregates (consumer_group, aggregate_id, tenant_id, "
            "aggregate_type, first_event_id, first_version, last_version, error_class, "
            "error_message) VALUES ('workflow-projector', %s, %s, 'user', %s, 1, 1, "
            "'Test', 'parked by the test')", (user, tenant_id, uuid4()))
    trace_id = uuid4().hex
    async with httpx.AsyncClient(base_url=urls["commands"], timeout=30) as client:
        registered = await client.post("/api/v1/commands/users", json={
            "user_id": str(user), "display_name": "再送 花子", "email": "redrive@example.jp"},
            headers={"Authorization": f"Bearer {admin.token(TEST_JWT_SECRET)}",
                     "traceparent": traceparent(trace_id)})
    assert registered.status_code == 201, registered.text
    spans = await collector.wait_for("the relay's send", lambda spans: any(
        s.name == f"send {USERS}" for s in of_trace(spans, trace_id)))
    send = one(of_trace(spans, trace_id), name=f"send {USERS}")
    await collector.wait_for("the parked event's process span", lambda spans: processing(
        spans, "workflow-projector", send) is not None)

    env = settings_env(isolated) | collector.env()
    retried = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "ringiflow", "dlq", "retry", str(user), "--group",
        "workflow-projector", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout)[0]["released"] is True

    spans = await collector.wait_for("the re-drive", lambda spans: any(
        s.name == "process workflow-projector.dlq" for s in of_trace(spans, trace_id)))
    redrive = one(of_trace(spans, trace_id), name="process workflow-projector.dlq")
    assert redrive.service == "ringiflow-cli"
    assert redrive.parent == send.span_id and (trace_id, send.span_id) in redrive.links
    assert redrive.attributes["messaging.consumer.group.name"] == "workflow-projector"
    assert any(s.parent == redrive.span_id and s.service == "ringiflow-cli"
               for s in spans), "the re-drive's store writes are not in the trace"

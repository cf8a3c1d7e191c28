"""Approvals on the whole stack lead to real deliveries: email to a real SMTP server
(in-process), chat and the external sync to a local HTTP receiver that checks the
signature; a receiver that refuses the sync leads to compensation in reverse and
`completion_failed`; a SIGKILLed saga worker resumes with no step done twice; a
redelivered notification command is delivered once; a permanent refusal goes to the
dispatcher's dead-letter queue."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from uuid import UUID, uuid4

import httpx
import orjson
import psutil
import pytest

from contract import NOTIFICATION_COMMANDS, dlq_topic
from infra.kafka import producer, read_from_start
from infra.mailcatcher import MailCatcher
from infra.settings import Settings
from tests.conftest import TEST_JWT_SECRET, component, settings_env
from tests.helpers import Person, Tenant, listening_pid

pytestmark = pytest.mark.slow
Q = "/api/v1/queries"
SECRET = "whsec-test-0123456789"


@dataclass
class Receiver:
    """Chat webhooks and the external system: records each request; /sync/ok answers
    200, /sync/refuse 400, /sync/slow holds its first request `hold_s` (time to kill the
    saga worker), /chat/ok 200, /chat/gone 404."""

    hold_s: float = 6.0
    seen: list[dict[str, Any]] = field(default_factory=list)
    held: threading.Event = field(default_factory=threading.Event)

    def requests(self, prefix: str) -> list[dict[str, Any]]:
        return [r for r in self.seen if r["path"].startswith(prefix)]

    def serve(self) -> ThreadingHTTPServer:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.seen.append({"path": self.path, "headers": dict(self.headers),
                                      "body": body})
                if self.path == "/sync/slow" and not receiver.held.is_set():
                    receiver.held.set()
                    time.sleep(receiver.hold_s)
                status = 400 if self.path == "/sync/refuse" else \
                    404 if self.path == "/chat/gone" else 200
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"unknown cost centre" if status == 400 else b"ok")

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


@dataclass
class World:
    urls: dict[str, str]
    settings: Settings
    mail: MailCatcher
    receiver: Receiver
    tenants: dict[str, UUID]  # "ok" | "refuse" | "slow" | "none" -> tenant id


@pytest.fixture(scope="module")
def world(isolated: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    receiver = Receiver()
    server = receiver.serve()
    base = f"http://127.0.0.1:{server.server_port}"
    tenants = {kind: uuid4() for kind in ("ok", "refuse", "slow", "none")}
    hooks = {str(tenants[kind]): {"url": f"{base}/sync/{kind}", "secret": SECRET}
             for kind in ("ok", "refuse", "slow")}
    with MailCatcher(tmp_path_factory.mktemp("mail")) as mail:
        env = {"RINGIFLOW_SMTP_URL": mail.url,
               "RINGIFLOW_COMPLETION_WEBHOOKS": json.dumps(hooks),
               "RINGIFLOW_NOTIFICATION_ATTEMPTS": "2"}
        settings = isolated.model_copy(update={"smtp_url": mail.url})
        with component("command-api", settings, "RINGIFLOW_COMMAND_API_PORT") as commands, \
                component("relay", settings, "RINGIFLOW_RELAY_PORT") as relay, \
                component("workers", settings, "RINGIFLOW_WORKERS_PORT", **env) as workers, \
                component("query-api", settings, "RINGIFLOW_QUERY_API_PORT") as queries:
            deadline = time.monotonic() + 90
            while httpx.get(workers + "/readyz", timeout=5).status_code != 200:
                assert time.monotonic() < deadline, httpx.get(workers + "/readyz").text
                time.sleep(0.5)
            yield World({"commands": commands, "relay": relay, "workers": workers,
                         "queries": queries, "receiver": base}, settings, mail, receiver,
                        tenants)
    server.shutdown()


@pytest.fixture
async def client(world: World) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=world.urls["commands"], timeout=30) as http:
        yield http


async def tenant_of(world: World, client: httpx.AsyncClient, kind: str) -> Tenant:
    return await Tenant(client, TEST_JWT_SECRET, world.settings.database_url or "",
                        tenant_id=world.tenants[kind]).setup()


async def approved(tenant: Tenant, title: str) -> UUID:
    created = await tenant.ok(tenant.initiator, "/workflows", {
        "definition_id": str(tenant.definition_id), "title": title, "documents": [
            {"document_id": str(uuid4()), "filename": "見積書.pdf",
             "content_type": "application/pdf", "size_bytes": 1234, "sha256": "ab" * 32}]})
    workflow = UUID(created["aggregate_id"])
    await tenant.ok(tenant.initiator, f"/workflows/{workflow}/submit")
    first, second = await tenant.step_ids(workflow)
    await tenant.ok(tenant.approver1, f"/workflows/{workflow}/steps/{first}/approve")
    await tenant.ok(tenant.approver2, f"/workflows/{workflow}/steps/{second}/approve")
    return workflow


async def completion(world: World, tenant: Tenant, workflow: UUID, until: set[str],
                     timeout_s: float = 60) -> dict[str, Any]:
    """The workflow's completion as the query API shows it, once its status is in
    `until`."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=world.urls["queries"], timeout=10) as queries:
        while True:
            answer = await queries.get(f"{Q}/workflows/{workflow}/completion",
                                       headers=tenant.headers(tenant.initiator))
            if answer.status_code == 200 and answer.json()["status"] in until:
                return answer.json()
            assert time.monotonic() < deadline, f"completion stuck: {answer.text}"
            await asyncio.sleep(0.3)


def mails_about(world: World, title: str) -> list[dict[str, Any]]:
    return [m for m in world.mail.received() if title in m["subject"]]


async def mails_until(world: World, title: str, enough: Callable[[list[dict]], bool],
                      timeout_s: float = 30) -> list[dict[str, Any]]:
    """The mails about `title` once `enough` says so (or the time is up)."""
    deadline = time.monotonic() + timeout_s
    for _ in itertools.count():
        mails = mails_about(world, title)
        if enough(mails) or time.monotonic() > deadline:
            return mails
        await asyncio.sleep(0.3)
    raise AssertionError("unreachable")


def event_types(events: list[dict[str, Any]]) -> list[str]:
    return [e["event_type"] for e in events]


def signed(request: dict[str, Any]) -> bool:
    expected = "sha256=" + hmac.new(SECRET.encode(), request["body"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(request["headers"]["X-RingiFlow-Signature"], expected)


async def test_an_approval_is_finalized_notified_and_synced(
        world: World, client: httpx.AsyncClient) -> None:
    tenant = await tenant_of(world, client, "ok")
    # The second approver reads English, by chat as well as email.
    await tenant.ok(tenant.approver2, f"/users/{tenant.approver2.user_id}/notification-"
                    "preferences", {"locale": "en", "channels": ["email", "chat"],
                                    "chat_webhook_url": world.urls["receiver"] + "/chat/ok"})
    workflow = await approved(tenant, "稟議: 完了処理の確認")

    done = await completion(world, tenant, workflow, {"completed", "completion_failed"})
    assert done["status"] == "completed", done
    assert [s["step"] for s in done["steps"]] == ["finalize", "notify", "sync", "record"]
    assert all(s["status"] == "done" for s in done["steps"])

    events = event_types(await tenant.events(workflow))
    assert events[-3:] == ["WorkflowApproved", "DocumentsFinalized", "WorkflowCompleted"]
    [sync] = world.receiver.requests("/sync/ok")
    assert signed(sync), "the receiver can verify the body came from RingiFlow"
    body = orjson.loads(sync["body"])
    assert (body["event"], body["workflow_id"]) == ("workflow.completed", str(workflow))
    assert body["manifest_sha256"] and body["documents"][0]["filename"] == "見積書.pdf"
    assert sync["headers"]["Idempotency-Key"].startswith(f"completion:{workflow}:")

    # Email: the initiator was told of the approval and of the completion, in Japanese.
    mails = await mails_until(world, "完了処理の確認", lambda m: len(m) >= 6)
    initiator_mail = {m["subject"] for m in mails
                      if m["to"] == [f"{tenant.initiator.user_id.hex[:8]}@example.jp"]}
    assert {"【承認済】稟議: 完了処理の確認", "【完了】稟議: 完了処理の確認"} <= initiator_mail
    english = [m["subject"] for m in mails
               if m["to"] == [f"{tenant.approver2.user_id.hex[:8]}@example.jp"]]
    assert "Completed: 稟議: 完了処理の確認" in english, mails
    chats = [orjson.loads(r["body"]) for r in world.receiver.requests("/chat/ok")]
    assert any(c["title"] == "Completed: 稟議: 完了処理の確認" for c in chats)
    assert len({m["notification_id"] for m in mails}) == len(mails), "each mail once"

    async with httpx.AsyncClient(base_url=world.urls["queries"]) as queries:
        listed = (await queries.get(f"{Q}/notifications", params={"workflow_id": str(workflow)},
                                    headers=tenant.headers(tenant.initiator))).json()["items"]
    assert {(n["kind"], n["channel"], n["status"]) for n in listed} >= {
        ("WorkflowCompleted", "email", "sent"), ("WorkflowCompleted", "chat", "sent"),
        ("WorkflowApproved", "email", "sent")}
    assert all(n["address"].endswith("/…") for n in listed if n["channel"] == "chat"), \
        "a chat webhook's URL is its credential: never shown whole"


async def test_a_refused_sync_compensates_in_reverse(
        world: World, client: httpx.AsyncClient) -> None:
    tenant = await tenant_of(world, client, "refuse")
    workflow = await approved(tenant, "稟議: 連携拒否")

    failed = await completion(world, tenant, workflow, {"completed", "completion_failed"})
    assert failed["status"] == "completion_failed", failed
    assert [(s["step"], s["status"]) for s in failed["steps"]] == [
        ("finalize", "done"), ("notify", "done"), ("sync", "failed"), ("correct", "done"),
        ("unfinalize", "done"), ("record", "done")]
    assert "400" in failed["last_error"]
    events = await tenant.events(workflow)
    assert event_types(events)[-4:] == ["WorkflowApproved", "DocumentsFinalized",
                                        "DocumentsUnfinalized", "WorkflowCompletionFailed"]
    snapshot = events[-1]["aggregate"]
    assert (snapshot["completion"], snapshot["documents_finalized"]) == \
        ("completion_failed", False)
    assert "unknown cost centre" in snapshot["completion_error"]
    mails = await mails_until(world, "連携拒否", lambda m: any(
        x["subject"] == "【訂正】稟議: 連携拒否" for x in m))
    assert "【訂正】稟議: 連携拒否" in {m["subject"] for m in mails}, \
        "the correction notice follows the completion notice"


async def test_without_an_endpoint_the_sync_is_skipped_not_failed(
        world: World, client: httpx.AsyncClient) -> None:
    tenant = await tenant_of(world, client, "none")
    workflow = await approved(tenant, "稟議: 連携先なし")
    done = await completion(world, tenant, workflow, {"completed", "completion_failed"})
    sync = next(s for s in done["steps"] if s["step"] == "sync")
    assert (done["status"], sync["status"]) == ("completed", "skipped")
    assert "no external endpoint" in sync["reason"]


def saga_worker(world: World) -> psutil.Process:
    children = psutil.Process(listening_pid(world.urls["workers"])).children()
    return next(p for p in children if "workflow-completion-saga" in " ".join(p.cmdline()))


async def test_a_killed_saga_worker_resumes_with_no_step_done_twice(
        world: World, client: httpx.AsyncClient) -> None:
    tenant = await tenant_of(world, client, "slow")
    workflow = await approved(tenant, "稟議: 途中停止")
    deadline = time.monotonic() + 60
    while not world.receiver.held.is_set():  # the sync is being sent: finalize, notify done
        assert time.monotonic() < deadline, "the saga never reached its sync step"
        await asyncio.sleep(0.1)
    victim = saga_worker(world)
    victim.kill()  # SIGKILL: no shutdown, no last write
    victim.wait(10)

    done = await completion(world, tenant, workflow, {"completed", "completion_failed"},
                            timeout_s=120)
    assert done["status"] == "completed", done
    assert saga_worker(world).pid != victim.pid, "the supervisor restarted the worker"
    events = event_types(await tenant.events(workflow))
    assert events.count("DocumentsFinalized") == 1 and events.count("WorkflowCompleted") == 1
    syncs = world.receiver.requests("/sync/slow")
    assert len({r["headers"]["Idempotency-Key"] for r in syncs}) == 1, \
        "a re-sent sync carries the same Idempotency-Key, so the receiver applies it once"
    await asyncio.sleep(2)  # let any duplicate notification arrive
    completed = [m["to"][0] for m in mails_about(world, "途中停止")
                 if m["subject"].startswith("【完了】")]
    assert sorted(completed) == sorted(f"{p.user_id.hex[:8]}@example.jp" for p in (
        tenant.initiator, tenant.approver1, tenant.approver2)), "each person told once"


async def test_a_redelivered_notification_is_sent_once_and_a_refused_one_dead_letters(
        world: World, client: httpx.AsyncClient) -> None:
    tenant = await tenant_of(world, client, "ok")
    person = Person(tenant.tenant_id, "通知 先子")
    await tenant.ok(tenant.admin, "/users", {"user_id": str(person.user_id),
                                             "display_name": person.name,
                                             "email": "sakiko@example.jp"})
    await tenant.ok(person, f"/users/{person.user_id}/notification-preferences", {
        "locale": "ja", "channels": ["email", "chat"],
        "chat_webhook_url": world.urls["receiver"] + "/chat/gone"})
    notification_id = str(uuid4())
    command = {"notification_id": notification_id, "type": "ApprovalRequested",
               "user_id": str(person.user_id), "tenant_id": str(tenant.tenant_id),
               "workflow_id": str(uuid4()), "title": "重複配信の確認", "step_name": "確認",
               "comment": None, "due_date": None, "caused_by": str(uuid4())}
    kafka = producer(world.settings.require("kafka_bootstrap"))
    for _ in range(3):  # as a redelivery or a replay with --notify would
        kafka.produce(NOTIFICATION_COMMANDS.name, orjson.dumps(command),
                      str(person.user_id).encode())
    kafka.flush(10)

    deadline = time.monotonic() + 30
    await mails_until(world, "重複配信の確認", bool)
    await asyncio.sleep(3)  # the other two copies have been consumed by now
    assert len(mails_about(world, "重複配信の確認")) == 1, "delivered once per notification id"

    dead: list[Any] = []
    while time.monotonic() < deadline + 30 and not dead:
        records = await read_from_start(world.settings.require("kafka_bootstrap"),
                                        dlq_topic("notification-dispatcher").name)
        dead = [r for r in records if orjson.loads(r.value)["notification_id"]
                == notification_id]
        await asyncio.sleep(0.5)
    assert dead, "the chat webhook's 404 is a permanent failure: dead-lettered"
    headers = {k: v.decode() for k, v in dead[0].headers}
    assert "404" in headers["dlq.error.message"] and "chat" in headers["dlq.error.message"]
    assert headers["dlq.group"] == "notification-dispatcher"


def ringiflow(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ringiflow", *args], capture_output=True,
                          text=True, timeout=60, env=settings_env(world.settings))


def test_operators_list_show_and_retry_sagas_and_list_what_was_sent(world: World) -> None:
    listed = json.loads(ringiflow(world, "saga", "list", "--json").stdout)
    assert {s["status"] for s in listed} >= {"completed", "completion_failed"}
    failed = next(s for s in listed if s["status"] == "completion_failed")
    shown = ringiflow(world, "saga", "show", failed["workflow_id"])
    assert shown.returncode == 0 and "sync" in shown.stdout and "failed" in shown.stdout
    done = next(s for s in listed if s["status"] == "completed")
    refused = ringiflow(world, "saga", "retry", done["workflow_id"])
    assert refused.returncode != 0 and "already succeeded" in refused.stderr
    unknown = ringiflow(world, "saga", "show", str(uuid4()))
    assert unknown.returncode != 0 and "no completion saga" in unknown.stderr

    # A failed completion runs again from the start (its receiver still refuses: it fails
    # again, compensated again, as run 2).
    retried = ringiflow(world, "saga", "retry", failed["workflow_id"])
    assert retried.returncode == 0 and "restarted" in retried.stdout, retried.stderr
    deadline = time.monotonic() + 60
    for _ in itertools.count():
        again = json.loads(ringiflow(world, "saga", "show", failed["workflow_id"],
                                     "--json").stdout)
        if again["status"] == "completion_failed" and again["run"] == 2:
            break
        assert time.monotonic() < deadline, again
        time.sleep(0.5)
    assert [s["step"] for s in again["steps"]][-1] == "record"

    sent = ringiflow(world, "notifications", "list", "--status", "sent")
    assert sent.returncode == 0 and "sent" in sent.stdout and "email" in sent.stdout

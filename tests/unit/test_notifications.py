"""Notification delivery without the stack: templates by locale, the per-recipient rate
limit, how each channel classes a receiver's answer (a real SMTP server in-process, a
local HTTP receiver), and the dispatcher's once-per-id, retry and give-up rules."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from infra.mailcatcher import MailCatcher, body_of
from infra.retry import Backoff
from notifications.channels import Chat, Email, Message, Permanent, Transient
from notifications.dispatcher import Dispatcher
from notifications.ledger import Recipient
from notifications.ratelimit import RateLimit
from notifications.runner import read_command
from notifications.templates import render

COMMAND = {"notification_id": str(uuid4()), "type": "ApprovalRequested",
           "user_id": str(uuid4()), "tenant_id": str(uuid4()), "workflow_id": str(uuid4()),
           "title": "ノートPC購入", "step_name": "課長承認", "comment": None,
           "due_date": "2026-12-24", "caused_by": str(uuid4())}


def test_templates_speak_the_recipients_language() -> None:
    assert render("ApprovalRequested", "ja", COMMAND) == (
        "【承認依頼】ノートPC購入",
        "ノートPC購入 の「課長承認」の承認をお願いします。\n期限: 2026-12-24")
    subject, body = render("ApprovalRequested", "en", COMMAND)
    assert subject == "Approval requested: ノートPC購入" and "Due: 2026-12-24" in body
    assert render("WorkflowApproved", "fr", COMMAND)[0] == "【承認済】ノートPC購入", \
        "an unknown locale falls back to Japanese"


def test_the_rate_limit_delays_a_little_over_and_holds_back_a_flood() -> None:
    limit = RateLimit(per_minute=60, burst=2, max_wait_s=2.5)
    waits = [limit.wait_s("u", now=100.0) for _ in range(5)]
    assert waits == [0.0, 0.0, 1.0, 2.0, None], "late a little, then held back"
    assert limit.wait_s("other", now=100.0) == 0.0, "per recipient"
    assert limit.wait_s("u", now=110.0) == 0.0, "refilled"
    default = RateLimit(per_minute=60, burst=2)
    assert [default.wait_s("u", now=0.0) for _ in range(3)] == [0.0, 0.0, None], \
        "by default nothing waits: one person's flood must not slow everyone's delivery"


async def test_a_flood_to_one_recipient_is_recorded_as_rate_limited_not_sent() -> None:
    channel, ledger = Flaky([]), MemoryLedger(PERSON)
    flooded = Dispatcher(ledger, {"email": channel}, RateLimit(1, 1, max_wait_s=0),  # type: ignore[arg-type]
                         Backoff(0.001, 0.01), attempts=3)
    first = await flooded.dispatch(COMMAND)
    second = await flooded.dispatch({**COMMAND, "notification_id": str(uuid4())})
    assert (first.sent, second.sent, channel.sent) == (["email"], [], 1)
    [held] = [row for (nid, _), row in ledger.rows.items() if nid != COMMAND["notification_id"]]
    assert held["status"] == "skipped" and "rate limited" in held["error"]


class Answer:
    """An aiosmtpd handler that answers DATA with a chosen reply."""

    def __init__(self, reply: str) -> None:
        self.reply = reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return self.reply


def message() -> Message:
    return Message(str(uuid4()), "taro@example.jp", "申請 太郎", "件名", "本文です")


async def test_email_is_sent_over_real_smtp_and_failures_are_classed(tmp_path: Path) -> None:
    with MailCatcher(tmp_path) as catcher:
        sent = message()
        await Email("127.0.0.1", catcher.controller.port, "RingiFlow <rf@localhost>").send(sent)
        [entry] = catcher.received()
        assert entry["to"] == ["taro@example.jp"] and entry["subject"] == "件名"
        assert entry["notification_id"] == sent.notification_id
        assert body_of(tmp_path, entry).strip() == "本文です"
    for reply, error in (("451 try again later", Transient), ("550 no such user", Permanent)):
        with MailCatcher(tmp_path / reply[:3], handler=Answer(reply)) as refusing, \
                pytest.raises(error, match=reply[:3]):
            await Email("127.0.0.1", refusing.controller.port, "rf@localhost").send(message())
    with pytest.raises(Transient, match="ConnectionRefused"):
        await Email("127.0.0.1", 1, "rf@localhost", timeout_s=1).send(message())


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A chat webhook receiver: /ok 200, /busy 503, /gone 404; records every request."""
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append({"path": self.path, "body": json.loads(body)})
            status = {"/ok": 200, "/busy": 503, "/gone": 404}[self.path]
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"no such channel" if status == 404 else b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()


async def test_chat_posts_json_and_classes_the_answer(
        receiver: tuple[str, list[dict[str, Any]]]) -> None:
    base, seen = receiver
    async with httpx.AsyncClient() as client:
        chat = Chat(client)
        sent = message()
        await chat.send(Message(sent.notification_id, base + "/ok", "x", "件名", "本文"))
        assert seen[0]["body"]["notification_id"] == sent.notification_id
        assert "件名" in seen[0]["body"]["text"]
        with pytest.raises(Transient, match="503"):
            await chat.send(Message(sent.notification_id, base + "/busy", "x", "s", "b"))
        with pytest.raises(Permanent, match="404: no such channel"):
            await chat.send(Message(sent.notification_id, base + "/gone", "x", "s", "b"))


class MemoryLedger:
    """The dispatcher's ledger, in memory: the database one is tested on the stack."""

    def __init__(self, recipient: Recipient | None) -> None:
        self.person = recipient
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}

    async def recipient(self, tenant: UUID, user: UUID) -> Recipient | None:
        return self.person

    async def status(self, tenant: UUID, notification_id: UUID, channel: str) -> str | None:
        row = self.rows.get((str(notification_id), channel))
        return row["status"] if row else None

    async def record(self, command: dict[str, Any], channel: str, status: str,
                     address: str | None, subject: str | None, attempts: int,
                     error: str | None = None) -> None:
        self.rows[(command["notification_id"], channel)] = {
            "status": status, "attempts": attempts, "error": error}


class Flaky:
    name = "email"

    def __init__(self, failures: list[Exception]) -> None:
        self.failures, self.sent = failures, 0

    async def send(self, message: Message) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.sent += 1


def dispatcher(channel: Flaky, ledger: MemoryLedger) -> Dispatcher:
    return Dispatcher(ledger, {"email": channel}, RateLimit(6000, 100),  # type: ignore[arg-type]
                      Backoff(0.001, 0.01), attempts=3)


PERSON = Recipient(uuid4(), "申請 太郎", "taro@example.jp", "ja", ("email",), None)


async def test_a_notification_goes_out_once_however_often_it_arrives() -> None:
    channel, ledger = Flaky([Transient("421 busy")]), MemoryLedger(PERSON)
    first = await dispatcher(channel, ledger).dispatch(COMMAND)
    again = await dispatcher(channel, ledger).dispatch(COMMAND)
    assert (first.sent, again.sent, channel.sent) == (["email"], [], 1)
    assert ledger.rows[(COMMAND["notification_id"], "email")]["attempts"] == 2


async def test_permanent_or_exhausted_failures_are_reported_for_the_dead_letter_queue() -> None:
    refused = await dispatcher(Flaky([Permanent("550 no such user")]),
                               MemoryLedger(PERSON)).dispatch(COMMAND)
    assert "550 no such user" in refused.failed["email"]
    exhausted = await dispatcher(Flaky([Transient("421")] * 3),
                                 MemoryLedger(PERSON)).dispatch(COMMAND)
    assert "after 3 attempts" in exhausted.failed["email"]
    with pytest.raises(Permanent, match="not registered"):
        await dispatcher(Flaky([]), MemoryLedger(None)).dispatch(COMMAND)


def test_an_unreadable_command_is_named() -> None:
    for value, says in ((b"{", "not a JSON"), (b"[]", "JSON object"),
                        (json.dumps({**COMMAND, "type": "Nope"}).encode(), "no template"),
                        (json.dumps({**COMMAND, "user_id": "x"}).encode(), "must be UUIDs"),
                        (json.dumps({"type": "ApprovalRequested"}).encode(), "without")):
        with pytest.raises(ValueError, match=says):
            read_command(value)

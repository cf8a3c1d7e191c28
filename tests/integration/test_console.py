"""The operator console driven in headless Chromium (its DevTools protocol, no driver
library) against the real stack: the live overview; a poison record's parked aggregate
discarded with a reason and the audit entry shown; a parked aggregate retried after a
dry-run preview, its event reaching the read model; a rebuild run to the end with its
progress; an aggregate browsed and time-travelled; a tenant admin kept to its tenant.
With RINGIFLOW_SCREENSHOTS=1 each page's screenshot replaces the one in
docs/screenshots/."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import uuid4

import httpx
import psycopg
import pytest
from websockets.sync.client import connect

from contract import WORKFLOW_EVENTS
from infra.kafka import producer
from infra.servers import free_port
from infra.settings import Settings, libpq_url
from tests.conftest import TEST_JWT_SECRET, component
from tests.helpers import Person, Tenant

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


class Browser:
    """One headless Chromium page, driven over the DevTools protocol."""

    def __init__(self, profile: Path) -> None:
        port = free_port()
        self.process = subprocess.Popen(
            [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
             f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
             "--window-size=1400,1100", "--hide-scrollbars", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                pages = httpx.get(f"http://127.0.0.1:{port}/json", timeout=1).json()
                target = next(p for p in pages if p["type"] == "page")
                break
            except (httpx.HTTPError, StopIteration, ValueError):
                assert time.monotonic() < deadline, "Chromium's DevTools did not answer"
                time.sleep(0.2)
        self.socket = connect(target["webSocketDebuggerUrl"], max_size=None)
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        number = next(self.ids)
        self.socket.send(json.dumps({"id": number, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == number:
                assert "error" not in message, message["error"]
                return message["result"]

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True,
                           returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait(self, expression: str, what: str, timeout_s: float = 30) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.js(expression)
            if value:
                return value
            assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
            time.sleep(0.25)

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && location.href !== 'about:blank'",
                  f"loading {url}")

    def text(self, element_id: str) -> str:
        return self.js(f"document.getElementById({element_id!r}).innerText") or ""

    def shot(self, name: str, tmp: Path) -> None:
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        assert len(data) > 20_000, f"{name}: a blank page"
        (tmp / name).write_bytes(data)
        if os.environ.get("RINGIFLOW_SCREENSHOTS") == "1":
            SCREENSHOTS.mkdir(exist_ok=True)
            (SCREENSHOTS / name).write_bytes(data)

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture(scope="module")
def console(system: dict[str, str], isolated: Settings) -> Iterator[str]:
    ports = {f"RINGIFLOW_{name.upper().replace('-', '_')}_PORT": str(urlsplit(url).port)
             for name, url in (("command-api", system["commands"]), ("relay", system["relay"]),
                               ("workers", system["workers"]),
                               ("query-api", system["queries"]))}
    with component("console", isolated, "RINGIFLOW_CONSOLE_PORT", **ports) as base:
        yield base


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.skip("needs Chromium (apt install chromium)")
    page = Browser(tmp_path / "profile")
    try:
        yield page
    finally:
        page.close()


def sign_in(browser: Browser, console: str, person: Person) -> None:
    browser.goto(console + "/login")
    token = person.token(TEST_JWT_SECRET)
    browser.js(f"document.getElementById('token').value = {token!r}; "
               "document.getElementById('sign-in').click(); true")
    browser.wait("location.pathname === '/' && document.readyState === 'complete' && "
                 "!!document.getElementById('who')", "signing in")


def show(browser: Browser, page: str) -> None:
    browser.js(f"location.hash = '#{page}'; true")
    browser.wait(f"document.getElementById('{page}').classList.contains('active')",
                 f"the {page} page")


def click_row(browser: Browser, table: str, needle: str) -> None:
    browser.js(f"""[...document.querySelectorAll('#{table} tr.clickable')]
        .find(r => r.innerText.includes({needle!r})).click(); true""")


def park(settings: Settings, tenant: Tenant, user: Any) -> None:
    """Hold `user`'s stream back in workflow-projector, as a dead letter before it does."""
    with psycopg.connect(libpq_url(settings.database_url or ""), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO streams.parked_aggregates (consumer_group, aggregate_id, tenant_id, "
            "aggregate_type, first_event_id, first_version, last_version, error_class, "
            "error_message) VALUES ('workflow-projector', %s, %s, 'user', %s, 1, 1, "
            "'Held', 'held back by the test')", (user, tenant.tenant_id, uuid4()))


async def test_the_console_in_a_real_browser(
        console: str, system: dict[str, str], isolated: Settings, browser: Browser,
        tmp_path: Path) -> None:
    async with httpx.AsyncClient(base_url=system["commands"], timeout=30) as client:
        tenant = await Tenant(client, TEST_JWT_SECRET, isolated.database_url or "").setup()
        created = await tenant.create_workflow("稟議: コンソールで確認")
        workflow = created["aggregate_id"]
        await tenant.ok(tenant.initiator, f"/workflows/{workflow}/submit")
        # A poison record: its headers name an aggregate, its bytes are no event.
        poisoned = uuid4()
        kafka = producer(isolated.kafka_bootstrap or "")
        kafka.produce(WORKFLOW_EVENTS.name, b"\xff not an event", str(poisoned).encode(),
                      headers=[("event_type", b"WorkflowCreated"),
                               ("aggregate_id", str(poisoned).encode()),
                               ("aggregate_type", b"workflow"),
                               ("tenant_id", str(tenant.tenant_id).encode()),
                               ("event_id", str(uuid4()).encode()), ("version", b"1")])
        assert kafka.flush(10) == 0
        # A user whose registration waits behind a dead letter, to be retried.
        held = Person(tenant.tenant_id, "保留 花子")
        park(isolated, tenant, held.user_id)
        await tenant.ok(tenant.admin, "/users", {"user_id": str(held.user_id),
                                                 "display_name": held.name,
                                                 "email": "horyu@example.jp"})

    operator = Person(tenant.tenant_id, "運用 担当", ["operator"])
    sign_in(browser, console, operator)

    # Overview: live, every group, the processes' health.
    browser.wait("document.getElementById('groups').innerText.includes('workflow-projector')"
                 " && document.getElementById('processes').innerText.includes('ready')",
                 "the live overview")
    overview = browser.text("groups")
    for group in ("cache-projector", "search-indexer", "notification-dispatcher",
                  "workflow-completion-saga"):
        assert group in overview
    first = browser.text("overview-at")
    browser.wait(f"document.getElementById('overview-at').innerText !== {first!r}",
                 "a live update without reloading", 15)
    browser.shot("console-overview.png", tmp_path)

    # Dead letters: the poison record's aggregate is parked; discard it with a reason.
    show(browser, "dead-letters")
    browser.wait(f"document.getElementById('dlq-parked').innerText.includes('{poisoned}')",
                 "the poison record's parked aggregate", 60)
    assert "UndecodableRecord" in browser.text("dlq-groups")
    browser.shot("console-dead-letters.png", tmp_path)
    click_row(browser, "dlq-parked", str(poisoned))
    browser.wait("document.getElementById('dlq-preview').innerText.includes('would re-drive')",
                 "the retry's dry-run preview")
    browser.js("document.getElementById('dlq-discard').click(); true")
    browser.wait("document.getElementById('dlq-result').innerText.includes('refused')",
                 "a discard without a reason is refused")
    browser.js("document.getElementById('dlq-reason').value = 'not an event: a bad producer';"
               "document.getElementById('dlq-discard').click(); true")
    browser.wait("document.getElementById('dlq-result').innerText.includes('released')",
                 "the discard")
    show(browser, "audit")
    browser.wait("document.getElementById('audit-list').innerText.includes("
                 "'not an event: a bad producer')", "the audit entry of the discard")
    assert "運用 担当" in browser.text("audit-list")

    # The held user: preview, retry, and the user reaches the read model.
    show(browser, "dead-letters")
    browser.wait(f"document.getElementById('dlq-parked').innerText.includes('{held.user_id}')",
                 "the held user's parked stream", 60)
    click_row(browser, "dlq-parked", str(held.user_id))
    browser.wait("document.getElementById('dlq-preview').innerText.includes('UserRegistered')",
                 "the preview of what a retry re-drives", 60)
    browser.js("document.getElementById('dlq-retry').click(); true")
    browser.wait("document.getElementById('dlq-result').innerText.includes('\"released\":true')",
                 "the retry")
    with psycopg.connect(libpq_url(isolated.database_url or "")) as conn:
        assert conn.execute("SELECT display_name FROM read_model.users WHERE id = %s",
                            (held.user_id,)).fetchone() == ("保留 花子",)

    # Event browser: the workflow's events, the read models' copies, time travel.
    show(browser, "events")
    browser.js(f"""{{ const f = document.getElementById('event-filter');
        f.elements.tenant.value = '{tenant.tenant_id}'; f.elements.aggregate.value = '{workflow}';
        f.requestSubmit(); }} true""")
    browser.wait("document.getElementById('event-list').innerText.includes('WorkflowSubmitted')",
                 "the workflow's events")
    assert "postgres: v" in browser.text("event-read-models")
    click_row(browser, "event-list", "WorkflowCreated")
    assert "snapshot_after" in browser.text("event-detail")
    browser.shot("console-events.png", tmp_path)
    created_at = browser.js("""[...document.querySelectorAll('#event-list tr.clickable')]
        .find(r => r.innerText.includes('WorkflowCreated')).cells[2].innerText""")
    browser.js(f"""{{ const f = document.getElementById('event-filter');
        f.elements.as_of.value = {created_at!r}; f.requestSubmit(); }} true""")
    browser.wait("!document.getElementById('event-list').innerText.includes('WorkflowSubmitted')"
                 " && document.getElementById('event-list').innerText.includes('WorkflowCreated')",
                 "time travel to the workflow's creation")

    # Live tail: a new workflow of this tenant appears as it is published.
    show(browser, "tail")
    browser.js(f"""{{ const f = document.getElementById('tail-filter');
        f.elements.tenant.value = '{tenant.tenant_id}'; f.requestSubmit(); }} true""")
    async with httpx.AsyncClient(base_url=system["commands"], timeout=30) as client:
        tenant.client = client
        for attempt in itertools.count():  # the tail starts at the end: keep publishing
            await tenant.create_workflow(f"稟議: 追尾 {attempt}")
            if browser.js("document.getElementById('tail-list').innerText"
                          ".includes('WorkflowCreated')"):
                break
            assert attempt < 15, "nothing published reached the live tail"
            await asyncio.sleep(1)

    # Rebuild: blue/green, with its progress, to the end.
    show(browser, "rebuilds")
    browser.js("document.getElementById('projector').value = 'workflow-projector';"
               "document.getElementById('rebuild').click(); true")
    browser.wait("document.getElementById('rebuild-output').innerText.includes('done')",
                 "the rebuild", 240)
    assert "read_model_v" in browser.text("rebuild-output")
    browser.shot("console-rebuild.png", tmp_path)
    browser.js("document.getElementById('verify').click(); true")
    browser.wait("document.getElementById('rebuild-output').innerText"
                 ".includes('workflow-projector: no differences')", "verify after the rebuild", 120)


async def test_a_tenant_admin_sees_only_its_tenant(
        console: str, system: dict[str, str], isolated: Settings, browser: Browser) -> None:
    async with httpx.AsyncClient(base_url=system["commands"], timeout=30) as client:
        theirs = await Tenant(client, TEST_JWT_SECRET, isolated.database_url or "").setup()
        created = await theirs.create_workflow("他社の稟議")
    stranger = Person(uuid4(), "他社 管理者", ["admin"])
    park(isolated, theirs, uuid4())
    sign_in(browser, console, stranger)

    show(browser, "events")
    browser.js(f"""{{ const f = document.getElementById('event-filter');
        f.elements.tenant.value = '{theirs.tenant_id}';
        f.elements.aggregate.value = '{created["aggregate_id"]}'; f.requestSubmit(); }} true""")
    browser.wait("document.getElementById('event-read-models').innerText.includes('refused')",
                 "another tenant's events refused")
    assert "他社の稟議" not in browser.js("document.body.innerText")

    show(browser, "dead-letters")
    browser.wait("document.getElementById('dlq-parked').innerText.includes('none')",
                 "no other tenant's parked aggregates")
    cookies = browser.call("Network.getCookies", urls=[console])["cookies"]
    session = next(c for c in cookies if c["name"] == "ringiflow_console")
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    # An action without the CSRF token is refused, even with the session cookie.
    async with httpx.AsyncClient(base_url=console) as client:
        forged = await client.post("/api/dead-letters/discard", cookies={
            "ringiflow_console": session["value"]}, json={
            "group": "workflow-projector", "aggregate_id": str(uuid4()),
            "tenant_id": str(stranger.tenant_id), "reason": "forged"})
        assert forged.status_code == 403 and "CSRF" in forged.text
        anonymous = await client.get("/api/overview")
        assert anonymous.status_code == 401, "nothing without a session"

"""Hostile input at both APIs' edges, against the real processes: credentials
are checked before a body is read, bodies and JSON nesting are bounded, and
every malformed value is a 422 naming its field -- never a 500, never a write.

The property-based half lets hypothesis pick the values (derandomized, so the
suite stays deterministic); the other half pins the cases the probe found."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from typing import Any
from uuid import uuid4

import httpx
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from infra.auth import mint_token
from infra.settings import Settings
from tests.conftest import TEST_JWT_SECRET, component
from tests.helpers import COMMANDS

Q = "/api/v1/queries"
TENANT = uuid4()
ADMIN = mint_token(TEST_JWT_SECRET, tenant_id=TENANT, user_id=uuid4(), name="admin",
                   roles=["admin"])
AUTH = {"Authorization": f"Bearer {ADMIN}"}
PROPERTY = hsettings(max_examples=60, derandomize=True, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture,
                                            HealthCheck.too_slow])


@pytest.fixture(scope="module")
def queries(settings: Settings) -> Iterator[str]:
    with component("query-api", settings, "RINGIFLOW_QUERY_API_PORT") as base:
        yield base


def event_count(settings: Settings) -> int:
    import psycopg

    from infra.settings import libpq_url

    with psycopg.connect(libpq_url(settings.database_url or "")) as conn:
        row = conn.execute("SELECT count(*) FROM event_store.events WHERE tenant_id = %s",
                           (TENANT,)).fetchone()
        return int(row[0]) if row else 0


def raw_post(base: str, path: str, headers: dict[str, str], first_bytes: bytes) -> str:
    """Send the headers and only the start of the body; return what the server says."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        sock.sendall(head.encode() + first_bytes)
        answer = b""
        while chunk := sock.recv(65536):  # the head and the body may come apart
            answer += chunk
            head_end = answer.find(b"\r\n\r\n")
            if head_end >= 0:
                length = next((int(line.split(b":", 1)[1]) for line in
                               answer[:head_end].lower().split(b"\r\n")
                               if line.startswith(b"content-length:")), 0)
                if len(answer) >= head_end + 4 + length:
                    break
        return answer.decode(errors="replace")


def test_a_huge_body_without_credentials_is_refused_before_it_is_read(
        command_api: str) -> None:
    started = time.monotonic()
    answer = raw_post(command_api, COMMANDS + "/users",
                      {"Content-Type": "application/json", "Content-Length": str(200 * 1024**2)},
                      b'{"display_name": "' + b"x" * 1024)
    assert answer.startswith("HTTP/1.1 401"), answer[:200]
    assert "application/problem+json" in answer and "missing credentials" in answer
    assert time.monotonic() - started < 5


def test_bodies_are_capped_with_413_before_they_are_read(command_api: str) -> None:
    answer = raw_post(command_api, COMMANDS + "/users",
                      {**AUTH, "Content-Type": "application/json",
                       "Content-Length": str(50 * 1024**2)}, b"{")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert "limited to 1048576 bytes" in answer
    # A chunked body (no Content-Length) is counted as it arrives.
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b" " * 65536

    response = httpx.post(command_api + COMMANDS + "/users", content=chunks(),
                          headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["code"] == "payload_too_large"


def test_deeply_nested_json_is_a_422_not_a_500(command_api: str, settings: Settings) -> None:
    before = event_count(settings)
    deep = "[" * 3000 + "]" * 3000
    for body in (deep, '{"display_name": ' + deep + ', "email": "a@b.jp"}'):
        response = httpx.post(command_api + COMMANDS + "/users", content=body,
                              headers={**AUTH, "Content-Type": "application/json"})
        assert response.status_code == 422, response.text
        assert response.json()["errors"][0]["type"] == "json_too_deep"
    # Brackets inside strings are text, not nesting.
    fine = httpx.post(command_api + COMMANDS + "/users", headers=AUTH, json={
        "display_name": "[" * 100, "email": f"{uuid4().hex[:8]}@example.jp"})
    assert fine.status_code == 201, fine.text
    assert event_count(settings) == before + 1


@pytest.mark.parametrize(("path", "field"), [
    ("/users", "display_name"), ("/users", "email"),
])
def test_a_nul_byte_is_a_422_naming_the_field(command_api: str, settings: Settings,
                                              path: str, field: str) -> None:
    before = event_count(settings)
    body = {"display_name": "山田", "email": "y@example.jp"} | {
        field: "y\x00@example.jp" if field == "email" else "山\x00田"}
    response = httpx.post(command_api + COMMANDS + path, headers=AUTH, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == field
    assert "control character U+0000" in response.json()["errors"][0]["message"]
    assert event_count(settings) == before


@pytest.mark.parametrize("value", [False, True, "0", 1.0])
def test_a_version_that_is_not_an_integer_is_a_422(command_api: str, settings: Settings,
                                                    value: Any) -> None:
    """The schema says integer: `false` must not pass as version 0 (schemathesis found
    a user created from it)."""
    before = event_count(settings)
    response = httpx.post(command_api + COMMANDS + "/users", headers=AUTH, json={
        "display_name": "山田", "email": f"{uuid4().hex[:8]}@example.jp",
        "expected_version": value})
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "expected_version"
    assert event_count(settings) == before


def test_nul_bytes_in_titles_and_comments_and_zero_width_text(command_api: str) -> None:
    workflow = uuid4()
    for path, body, field in [
        ("/workflows", {"definition_id": str(uuid4()), "title": "a\x00b"}, "title"),
        (f"/workflows/{workflow}/comments", {"body": "a\x00b"}, "body"),
        (f"/workflows/{workflow}/steps/{uuid4()}/reject", {"comment": "\u200b\u200b"},
         "comment"),
        ("/users", {"display_name": "\u2060 \ufeff", "email": "z@example.jp"},
         "display_name"),
    ]:
        response = httpx.post(command_api + COMMANDS + path, headers=AUTH, json=body)
        assert response.status_code == 422, (path, response.text)
        assert response.json()["errors"][0]["field"] == field, response.text


def b64(value: Any, prefix: str = "ct2.") -> str:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return prefix + base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize("token", [
    b64(["workflow", str(uuid4()), "1"]),            # version of the wrong type
    b64(["workflow", 123, 1]),                        # id of the wrong type
    b64([["workflow"], str(uuid4()), 1]),             # kind of the wrong type
    b64(["workflow", str(uuid4()), True]),            # a bool is not a version
    b64(b'["workflow", "' + str(uuid4()).encode() + b'", Infinity]'),
    b64(b'["workflow", "' + str(uuid4()).encode() + b'", 1e400]'),
    b64(["workflow", str(uuid4()), 2**40]),           # beyond the version column
    b64(json.loads("[" * 50 + "]" * 50)),
    "ct1." + "W" * 4000,                              # 3,000-deep nesting, or just long
    b64({"kind": "workflow"}),
    b64(["workflow", str(uuid4()), 1, 5], prefix="ct2."),  # ct2 has three fields
])
def test_malformed_consistency_tokens_are_422(queries: str, token: str) -> None:
    for path in ("/workflows", f"/workflows/{uuid4()}", "/my-tasks", "/search?q=x"):
        response = httpx.get(queries + Q + path, headers={**AUTH, "X-Consistency-Token": token})
        assert response.status_code == 422, (path, response.text)
        assert response.json()["code"] == "invalid_consistency_token"


def test_a_version_1_token_still_reads(queries: str) -> None:
    token = b64(["workflow", str(uuid4()), 1, 123], prefix="ct1.")
    response = httpx.get(queries + Q + "/workflows", params={"wait_ms": 0},
                         headers={**AUTH, "X-Consistency-Token": token})
    assert response.status_code == 200 and response.headers["X-Consistency"] == "timeout"


def cursor(*fields: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(fields)).encode()).decode().rstrip("=")


@pytest.mark.parametrize(("sort", "value"), [
    ("priority", 10**30), ("priority", 2**63), ("priority", 1.5), ("priority", "4"),
    ("created", "99999-01-01T00:00:00Z"), ("created", "2026-01-01T00:00:00"),
    ("due", 12345), ("updated", None),
])
def test_a_cursor_whose_value_does_not_fit_is_422(queries: str, sort: str, value: Any) -> None:
    response = httpx.get(queries + Q + "/workflows", headers=AUTH, params={
        "sort": sort, "cursor": cursor(sort, "desc", value, str(uuid4()))})
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_cursor"
    response = httpx.get(queries + Q + "/workflows", headers=AUTH, params={
        "sort": "created", "cursor": cursor("created", "desc", "2026-01-01T00:00:00Z", 7)})
    assert response.status_code == 422


# --- properties: whatever the value, a 2xx or a 4xx that names it ------------------------

TEXT = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["\x00", "a\x00", "\u200b", " \ufeff ", "\x1b[31m", "\x7f", "😀" * 10, "𠮷野家"])


@PROPERTY
@given(display_name=TEXT, email=TEXT)
def test_any_user_text_is_accepted_or_named(command_api: str, display_name: str,
                                            email: str) -> None:
    response = httpx.post(command_api + COMMANDS + "/users", headers=AUTH,
                          json={"display_name": display_name, "email": email})
    assert response.status_code in (201, 422), response.text
    if response.status_code == 422:
        fields = {e["field"] for e in response.json()["errors"]}
        assert fields <= {"display_name", "email"} and fields, response.text


@PROPERTY
@given(value=st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=10))
def test_any_consistency_token_body_is_read_or_refused(queries: str, value: Any) -> None:
    token = b64(json.dumps(value, allow_nan=True).encode())
    response = httpx.get(queries + Q + "/workflows", params={"wait_ms": 0},
                         headers={**AUTH, "X-Consistency-Token": token})
    assert response.status_code in (200, 422), response.text


@PROPERTY
@given(value=st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=30),
                       st.none(), st.lists(st.integers(), max_size=2)),
       sort=st.sampled_from(["created", "updated", "due", "priority"]))
def test_any_cursor_value_is_read_or_refused(queries: str, value: Any, sort: str) -> None:
    response = httpx.get(queries + Q + "/workflows", headers=AUTH, params={
        "sort": sort, "cursor": cursor(sort, "desc", value, str(uuid4()))})
    assert response.status_code in (200, 422), response.text

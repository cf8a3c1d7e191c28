"""The OpenAPI documents and docs pages of both APIs, read from real processes: docs
that work offline with an Authorize button, every error documented as problem+json,
the formats of the headers the APIs read and write, and query parameters as strict as
documented."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import jsonschema
import pytest

from commands.app import IDEMPOTENCY_KEY
from infra.auth import mint_token
from infra.openapi import (
    CONSISTENCY_TOKEN_MAX_LENGTH,
    CONSISTENCY_TOKEN_PARAMETER,
    CONSISTENCY_TOKEN_PATTERN,
)
from infra.problems import PROBLEM_JSON, Problem
from infra.settings import Settings
from tests.conftest import TEST_JWT_SECRET, component

COMMANDS, QUERIES = "/api/v1/commands", "/api/v1/queries"
ASSET_TYPES = {".js": ("text/javascript", "application/javascript"), ".css": ("text/css",),
               ".png": ("image/png",)}


@pytest.fixture(scope="module")
def query_api(settings: Settings) -> Iterator[str]:
    with component("query-api", settings, "RINGIFLOW_QUERY_API_PORT") as base:
        yield base


@pytest.fixture(params=["commands", "queries"])
def api(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("command_api" if request.param == "commands" else "query_api")


def spec_of(base: str) -> dict[str, Any]:
    response = httpx.get(base + "/openapi.json", timeout=10)
    assert response.status_code == 200
    return response.json()


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield f"{method.upper()} {path}", operation


def token(roles: list[str] | None = None) -> str:
    return mint_token(TEST_JWT_SECRET, tenant_id=uuid4(), user_id=uuid4(), name="doc reader",
                      roles=roles or ["user"])


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_every_asset_from_the_api_itself(api: str, page: str) -> None:
    html = httpx.get(api + page, timeout=10)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert "http://" not in html.text and "https://" not in html.text and "//cdn" not in html.text
    urls = re.findall(r'(?:src|href)="([^"]+)"', html.text)
    assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls
    assert "/openapi.json" in html.text
    for url in urls:
        asset = httpx.get(api + url, timeout=10)
        assert asset.status_code == 200, url
        suffix = url[url.rindex("."):]
        assert asset.headers["content-type"].startswith(ASSET_TYPES[suffix]), \
            (url, asset.headers["content-type"])
        assert len(asset.content) > 1000, url
    if page == "/docs":
        bundle = next(u for u in urls if u.endswith(".js"))
        assert "SwaggerUIBundle" in httpx.get(api + bundle, timeout=10).text
        # Swagger UI 5 (OpenAPI 3.1); no validator badge fetched from the internet.
        assert '"validatorUrl": null' in html.text


def test_the_bearer_scheme_is_declared_and_applied_to_every_protected_route(api: str) -> None:
    spec = spec_of(api)
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == schemes["bearerAuth"] | {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    assert schemes["apiKeyAuth"] | {} == schemes["apiKeyAuth"] | {
        "type": "apiKey", "in": "header", "name": "X-API-Key"}
    protected = 0
    for name, operation in operations(spec):
        headers = {p["name"].lower() for p in operation.get("parameters", [])
                   if p["in"] == "header"}
        assert not headers & {"authorization", "x-api-key"}, name  # the schemes say it
        if " /api/" in name:
            protected += 1
            assert {"bearerAuth": []} in operation["security"], name
        else:
            assert "security" not in operation, name
    assert protected >= 6
    # ... and the routes really are protected: no token, a 401 the document lists.
    path, method = (f"{COMMANDS}/users", "post") if f"{COMMANDS}/users" in spec["paths"] \
        else (f"{QUERIES}/workflows", "get")
    refused = httpx.request(method, api + path, json={}, timeout=10)
    assert refused.status_code == 401 and "401" in spec["paths"][path][method]["responses"]


def test_every_error_a_route_answers_is_documented_as_problem_json(api: str) -> None:
    spec = spec_of(api)
    problem = spec["components"]["schemas"]["Problem"]
    body = Problem(409, "version_conflict", "Version conflict", "x", current_version=3).body("/p")
    jsonschema.validate(body, {**problem, "components": spec["components"]})
    assert set(problem["required"]) <= set(body)
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for name, operation in operations(spec):
        if " /api/" not in name:
            continue
        statuses = {int(s) for s in operation["responses"]}
        expected = {401, 413, 422, 503}  # the edge guard bounds any body, and its nesting
        if name.startswith("POST"):
            expected |= {400, 409, 413}
            if "{" in name:
                expected |= {403, 404}
        elif "{workflow_id}" in name:
            expected |= {404}
        assert expected <= statuses, (name, sorted(statuses))
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                assert list(response["content"]) == [PROBLEM_JSON], (name, status)
                assert response["content"][PROBLEM_JSON]["schema"] == \
                    {"$ref": "#/components/schemas/Problem"}


def test_documented_examples_conform_to_their_schemas(api: str) -> None:
    spec = spec_of(api)
    checked = 0
    for name, operation in operations(spec):
        for status, response in operation["responses"].items():
            for media in response.get("content", {}).values():
                if "example" in media:
                    jsonschema.validate(media["example"],
                                        {**media["schema"], "components": spec["components"]})
                    checked += 1
                    assert status.startswith("2"), name
    assert checked >= (1 if "/api/v1/queries/workflows" in spec["paths"] else 0)


def test_idempotency_key_and_consistency_token_formats_are_documented(
    command_api: str, query_api: str,
) -> None:
    commands = spec_of(command_api)
    for name, operation in operations(commands):
        if " /api/" not in name:
            continue
        header = next(p for p in operation["parameters"] if p["name"] == "Idempotency-Key")
        assert header["in"] == "header" and not header["required"]
        assert header["schema"]["maxLength"] == 255
        assert header["schema"]["pattern"] == IDEMPOTENCY_KEY.pattern
        assert "Idempotent-Replayed" in header["description"]
        assert "idempotency_key_reused" in header["description"]
        ok = next(r for s, r in operation["responses"].items() if s.startswith("2"))
        assert ok["headers"]["X-Correlation-ID"]["required"] is True
        assert "Idempotent-Replayed" in ok["headers"]
    returned = commands["components"]["schemas"]["CommandAccepted"]["properties"]
    assert returned["consistency_token"]["pattern"] == CONSISTENCY_TOKEN_PATTERN
    assert "X-Consistency-Token" in returned["consistency_token"]["description"]

    queries = spec_of(query_api)
    waiting = 0
    for name, operation in operations(queries):
        params = {(p["in"], p["name"]): p for p in operation.get("parameters", [])}
        if ("header", "X-Consistency-Token") in params:
            waiting += 1
            for key in (("header", "X-Consistency-Token"), ("query", "after")):
                assert params[key]["schema"] == CONSISTENCY_TOKEN_PARAMETER, name
            assert "X-Consistency" in operation["responses"]["200"]["headers"], name
            assert "429" in operation["responses"], name
    assert waiting == 4  # list, detail, my-tasks, search

    # What the documents say is what the API does: a command's token has the documented
    # format, and a retry with the same key replays the same response, marked.
    admin, key = token(["admin"]), f"doc-{uuid4()}"
    body = {"display_name": "山田", "email": "y@example.jp"}
    headers = {"Authorization": f"Bearer {admin}", "Idempotency-Key": key}
    first = httpx.post(command_api + f"{COMMANDS}/users", json=body, headers=headers)
    again = httpx.post(command_api + f"{COMMANDS}/users", json=body, headers=headers)
    assert first.status_code == again.status_code == 201, first.text
    assert again.headers["Idempotent-Replayed"] == "true" and again.json() == first.json()
    assert re.match(CONSISTENCY_TOKEN_PATTERN, first.json()["consistency_token"])
    assert len(first.json()["consistency_token"]) <= CONSISTENCY_TOKEN_MAX_LENGTH
    bad_key = httpx.post(command_api + f"{COMMANDS}/users", json=body,
                         headers={**headers, "Idempotency-Key": "x" * 256})
    assert bad_key.status_code == 422 and bad_key.json()["code"] == "invalid_header"


@pytest.mark.parametrize(("path", "param", "value"), [
    ("/workflows", "due_before", "0.5"),
    ("/workflows", "due_after", "1700000000"),
    ("/workflows", "due_before", "2026-11-01"),           # a date alone
    ("/workflows", "due_before", "2026-11-01T09:00:00"),  # no time zone
    ("/workflows/{id}", "as_of", "0.5"),
])
def test_date_time_parameters_take_only_iso_8601_with_a_zone(
    query_api: str, path: str, param: str, value: str,
) -> None:
    url = query_api + QUERIES + path.replace("{id}", str(uuid4()))
    refused = httpx.get(url, params={param: value},
                        headers={"Authorization": f"Bearer {token()}"}, timeout=10)
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"] == PROBLEM_JSON
    assert [e["field"] for e in refused.json()["errors"]] == [param]
    assert param in refused.json()["detail"]


def test_iso_8601_date_times_with_a_zone_are_accepted(query_api: str) -> None:
    headers = {"Authorization": f"Bearer {token()}"}
    for value in ("2026-11-01T09:00:00Z", "2026-11-01T18:00:00+09:00",
                  "2026-11-01T09:00:00.123456+00:00"):
        listed = httpx.get(f"{query_api}{QUERIES}/workflows", headers=headers, timeout=10,
                           params={"due_before": value, "due_after": "2020-01-01T00:00:00Z"})
        assert listed.status_code == 200, (value, listed.text)
        assert listed.json() == {"items": [], "next_cursor": None}


def test_the_event_contract_is_published_without_credentials(query_api: str) -> None:
    """The AsyncAPI document and each event type's JSON Schema, as a consumer team would
    fetch them; an unknown event type is a problem+json 404 naming the known ones."""
    document = httpx.get(query_api + "/asyncapi.json", timeout=10)
    assert document.status_code == 200 and document.json()["asyncapi"].startswith("3.")
    addresses = {c["address"] for c in document.json()["channels"].values()}
    assert "ringiflow.workflow.events" in addresses
    schema = httpx.get(query_api + "/schemas/events/WorkflowApproved.json", timeout=10)
    assert schema.status_code == 200
    assert schema.headers["content-type"] == "application/schema+json"
    assert schema.json()["properties"]["event_type"] == {"const": "WorkflowApproved"}
    jsonschema.Draft202012Validator.check_schema(schema.json())
    unknown = httpx.get(query_api + "/schemas/events/WorkflowArchived.json", timeout=10)
    assert unknown.status_code == 404 and unknown.headers["content-type"] == PROBLEM_JSON
    assert "WorkflowApproved" in unknown.json()["detail"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt install chromium)")
def test_swagger_ui_renders_offline_in_a_real_browser_with_authorize(
        api: str, tmp_path: Path) -> None:
    """Headless Chromium with every host but the API's unresolvable (as offline): the
    page must render its operations and the Authorize button. With
    RINGIFLOW_SCREENSHOTS=1 its screenshot replaces the one in docs/screenshots/."""
    name = "commands" if "command" in spec_of(api)["info"]["title"].lower() else "queries"
    shot = tmp_path / f"swagger-{name}.png"
    browser = [CHROMIUM or "", "--headless", "--no-sandbox", "--disable-gpu",
               "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000",
               "--window-size=1280,1400", "--hide-scrollbars"]
    dom = subprocess.run([*browser, "--dump-dom", api + "/docs"], capture_output=True,
                         text=True, timeout=120, check=False).stdout
    assert 'class="btn authorize' in dom, dom[:2000]  # the Authorize button
    assert "opblock-tag" in dom and "/healthz" in dom  # the operations, from /openapi.json
    assert "Failed to load API definition" not in dom
    subprocess.run([*browser, f"--screenshot={shot}", api + "/docs"], capture_output=True,
                   timeout=120, check=True)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    if os.environ.get("RINGIFLOW_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOTS / shot.name)

"""Schemathesis over both APIs, running as real processes on the full pipeline.

Every operation gets schema examples, boundary and negative cases (coverage), random
valid and invalid requests (fuzzing), and stateful sequences that follow the documents'
OpenAPI links (RegisterUser -> CreateDefinition -> CreateWorkflow -> SubmitWorkflow ...
on the command API; ListWorkflows -> GetWorkflow -> GetWorkflowHistory, next page ...
on the query API). The two APIs are separate apps, so each has its own links; the query
API reads what the seeded commands and the command run wrote.

Derandomized (the same cases every run) and bounded in examples per operation, so a
failure reproduces. Any 5xx, any response that does not match its documented schema,
status, content type or headers, any invalid request accepted, and any route that
ignores missing credentials fails the test with schemathesis' curl reproducer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.settings import Settings
from tests.conftest import TEST_JWT_SECRET
from tests.helpers import Person, Tenant

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).with_name("schemathesis.toml")  # examples per phase, steps
CHECKS = (
    "not_a_server_error", "status_code_conformance", "content_type_conformance",
    "response_headers_conformance", "response_schema_conformance",
    "negative_data_rejection", "missing_required_header", "unsupported_method",
    "allow_header_conformance", "use_after_free", "ensure_resource_availability",
    "ignored_auth",
)
# Not positive_data_acceptance: a schema-valid command is refused with 403, 404, 409 or
# 422 when it names an aggregate that does not exist (or not in a state, or not of a
# caller, that allows it), or reuses an Idempotency-Key for another request (documented),
# which no schema can rule out.
WAITING = 4  # workflows awaiting approver1, for the step commands to decide


async def seed(commands: str, queries: str, database_url: str) -> dict[str, Any]:
    """A tenant with workflows in most states; the consistency tokens of its writes, once
    the query API has applied them; and its ids, for the hooks (fuzz_hooks)."""
    tokens: list[str] = []
    async with httpx.AsyncClient(base_url=commands, timeout=30) as client:
        tenant = await Tenant(client, TEST_JWT_SECRET, database_url).setup()

        async def ok(person: Person, path: str, body: dict[str, Any] | None = None) -> str:
            tokens.append((await tenant.ok(person, path, body))["consistency_token"])
            return path

        approved, steps = await tenant.submitted_workflow()
        await ok(tenant.approver1, f"/workflows/{approved}/steps/{steps[0]}/approve",
                 {"comment": "課長承認済み"})
        changes, steps = await tenant.submitted_workflow()
        await ok(tenant.approver1, f"/workflows/{changes}/steps/{steps[0]}/request-changes",
                 {"comment": "見積書を添付してください"})
        created = await tenant.ok(tenant.initiator, "/workflows", {
            "definition_id": str(tenant.definition_id), "title": "大阪出張 travel to Osaka",
            "description": "新幹線とホテル", "priority": "urgent",
            "due_date": "2030-01-31T09:00:00+09:00",
            "documents": [{"filename": "見積書.pdf", "content_type": "application/pdf",
                           "size_bytes": 12345, "sha256": "ab" * 32,
                           "url": "https://files.example.jp/quote.pdf"}]})
        draft = created["aggregate_id"]
        tokens.append(created["consistency_token"])
        await ok(tenant.initiator, f"/workflows/{draft}/comments", {"body": "よろしくお願いします"})
        waiting = [await tenant.submitted_workflow() for _ in range(WAITING)]
        cancelled, _ = await tenant.submitted_workflow()
        await ok(tenant.initiator, f"/workflows/{cancelled}/cancel", {"reason": "不要になった"})
    reader = {"Authorization": f"Bearer {tenant.approver1.token(TEST_JWT_SECRET)}"}
    async with httpx.AsyncClient(base_url=queries, timeout=30) as client:
        for path, params in (("/workflows", {}), ("/search", {"q": "出張"})):
            for token in tokens[-2:]:
                read = await client.get(f"/api/v1/queries{path}", headers=reader,
                                        params={**params, "after": token, "wait_ms": 10_000})
                assert read.headers.get("X-Consistency") == "reached", (path, read.text)
    workflows = [approved, changes, draft, cancelled, *(w for w, _ in waiting)]
    return {"tenant": tenant, "tokens": tokens, "ids": {
        "users": [str(p.user_id) for p in (tenant.initiator, tenant.approver1, tenant.approver2)],
        "definitions": [str(tenant.definition_id)],
        "workflows": [str(w) for w in workflows],
        "steps": [[str(w), str(s[0])] for w, s in waiting]}}


@pytest.fixture(scope="module")
async def seeded(system: dict[str, str], isolated: Settings) -> dict[str, Any]:
    return await seed(system["commands"], system["queries"], isolated.database_url or "")


def schemathesis_run(base: str, person: Person, seeded: dict[str, Any], report: Path) -> str:
    """Run `st run` on one API; return its output, after asserting it found nothing."""
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG),
        "run", f"{base}/openapi.json",
        "-H", f"Authorization: Bearer {person.token(TEST_JWT_SECRET)}",
        "--checks", ",".join(CHECKS), "--generation-deterministic", "--workers", "1",
        "--request-timeout", "30",
        # The credentials are the scheme's; generating X-API-Key values would only
        # replace the token with unknown keys.
        "--generation-with-security-parameters", "false",
        "--continue-on-failure", "--output-sanitize", "false", "--no-color",
        "--report", "junit", "--report-junit-path", str(report),
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.integration.fuzz_hooks",
           "RINGIFLOW_FUZZ_TOKENS": json.dumps(seeded["tokens"]),
           "RINGIFLOW_FUZZ_IDS": json.dumps(seeded["ids"]), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=280, check=False)
    output = result.stdout + result.stderr
    # Phases (with the stateful scenarios and links covered), any warnings and the
    # summary, in the test's captured output.
    warnings = re.search(r"^=+ WARNINGS =+$(.*?)^=+ SUMMARY", output, re.M | re.S)
    print("\n".join(line for line in output.splitlines() if re.match(
        r"\s*(✅|❌|⏭|🚫|⚠️|Scenarios:|API Links:|Selected:|Tested:|\d+ generated|=+ .* in )",
        line)))
    print(warnings.group(1).strip() if warnings else "")
    assert result.returncode == 0, output[output.find("=== FAILURES"):][:30_000] or output
    assert re.search(r"Tested: \d+", output) and re.search(r"\d+ generated", output), output
    return output


def links_covered(output: str) -> int:
    found = re.search(r"API Links:\s+(\d+) covered", output)
    return int(found.group(1)) if found else 0


def test_command_api_survives_schemathesis(system: dict[str, str], seeded: dict[str, Any],
                                           tmp_path: Path) -> None:
    tenant: Tenant = seeded["tenant"]
    # An admin who is also approver1, the assignee of the seeded pending steps: the step
    # commands get as far as deciding them.
    caller = Person(tenant.tenant_id, tenant.approver1.name, ["admin"], tenant.approver1.user_id)
    output = schemathesis_run(system["commands"], caller, seeded, tmp_path / "commands.xml")
    assert "Tested: 16" in output  # the 14 commands, /healthz and /readyz
    # Stateful runs follow most links (19 of 20 typically): from a new user to commands
    # on the workflow created from its definition.
    assert links_covered(output) >= 10, output


def test_query_api_survives_schemathesis(system: dict[str, str], seeded: dict[str, Any],
                                         tmp_path: Path) -> None:
    tenant: Tenant = seeded["tenant"]
    output = schemathesis_run(system["queries"], tenant.approver1, seeded,
                              tmp_path / "queries.xml")
    # eight queries, /healthz, /readyz, and the contract (/asyncapi.json, an event's schema)
    assert "Tested: 12" in output
    assert links_covered(output) >= 6, output  # of 9 (all, typically)

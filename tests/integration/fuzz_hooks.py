"""Schemathesis hooks for test_fuzz_api.py, loaded by the `st` process it runs
(SCHEMATHESIS_HOOKS=tests.integration.fuzz_hooks).

They keep generated requests meaningful without making them less hostile: a
schema-valid Idempotency-Key gets a unique suffix (random short keys such as "0"
would otherwise collide and every later command would be refused as a reused key),
a RegisterUser gets a fresh user id (derandomized generation repeats a few), and a
consistency token that fits the documented pattern is swapped for a real one
(RINGIFLOW_FUZZ_TOKENS: what the seeded commands returned), so reads also wait for and
reach real writes.

No response names a step id, and a random UUID names nothing, so most generated
references would stop at 404 or `unknown_reference` before the logic behind them. Three
of every four UUIDs that name no aggregate the tenant has (seeded, RINGIFLOW_FUZZ_IDS, or
created during the run) are therefore replaced by a seeded one of the right kind: users
(step assignees, `delegate_to`), definitions, workflows and (workflow, pending step)
pairs; the fourth keeps testing the unknown-id paths. Invalid keys, tokens and ids (not
UUIDs) are left as generated."""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import MutableMapping
from typing import Any
from uuid import UUID, uuid5

import schemathesis

from commands.app import IDEMPOTENCY_KEY
from infra.openapi import CONSISTENCY_TOKEN_PATTERN

TOKENS: list[str] = json.loads(os.environ.get("RINGIFLOW_FUZZ_TOKENS", "[]"))
IDS: dict[str, list[Any]] = json.loads(os.environ.get("RINGIFLOW_FUZZ_IDS", "{}"))
USERS: list[str] = IDS.get("users", [])
DEFINITIONS: list[str] = IDS.get("definitions", [])
WORKFLOWS: list[str] = IDS.get("workflows", [])
STEPS: list[tuple[str, str]] = [(w, s) for w, s in IDS.get("steps", [])]
_TOKEN = re.compile(CONSISTENCY_TOKEN_PATTERN)
_serial = itertools.count()
_swaps = itertools.count()
FUZZ_NAMESPACE = UUID("2b3f6c1e-8d4a-4f7e-9c2b-5a6d7e8f9a0b")
# Every aggregate id the tenant is known to have: a link's value is left alone.
_known: set[str] = {*USERS, *DEFINITIONS, *WORKFLOWS, *(w for w, _ in STEPS)}


def _unique_key(value: Any) -> Any:
    if isinstance(value, str) and IDEMPOTENCY_KEY.match(value) and len(value) < 240:
        return f"{value}.{next(_serial)}"
    return value


def _is_uuid(value: Any) -> bool:
    try:
        UUID(str(value))
    except ValueError:
        return False
    return isinstance(value, str)


def _fresh_id(value: Any) -> Any:
    """A new user id for each RegisterUser: derandomized generation repeats a few UUIDs,
    and every repeat would be refused as `already_exists`."""
    if not _is_uuid(value):
        return value
    return str(uuid5(FUZZ_NAMESPACE, str(next(_serial))))


def _real_token(value: Any) -> Any:
    if TOKENS and isinstance(value, str) and _TOKEN.match(value):
        return TOKENS[len(value) % len(TOKENS)]
    return value


def _swap(value: Any) -> int | None:
    """Which seeded id (an index, modulo the pool) replaces `value`, or None to keep it."""
    if not _is_uuid(value) or value.lower() in _known:
        return None
    turn = next(_swaps)
    return None if turn % 4 == 3 else turn


def _known_id(value: Any, pool: list[str]) -> Any:
    index = _swap(value) if pool else None
    return value if index is None else pool[index % len(pool)]


def _references(case: schemathesis.Case) -> None:
    body, path = case.body, case.path_parameters
    if isinstance(body, MutableMapping):
        if "definition_id" in body:
            body["definition_id"] = _known_id(body["definition_id"], DEFINITIONS)
        if "delegate_to" in body:
            body["delegate_to"] = _known_id(body["delegate_to"], USERS)
        if isinstance(body.get("steps"), list):
            for step in body["steps"]:
                if isinstance(step, MutableMapping) and "assignee_id" in step:
                    step["assignee_id"] = _known_id(step["assignee_id"], USERS)
    if not isinstance(path, MutableMapping) or "workflow_id" not in path:
        return
    if "step_id" in path:
        # A step id is only known with its workflow (the generators also reuse ids they
        # saw, so either may be a real one on its own).
        pair = (str(path["workflow_id"]).lower(), str(path["step_id"]).lower())
        index = _swap(path["step_id"]) if STEPS and pair not in STEPS else None
        if index is not None:
            path["workflow_id"], path["step_id"] = STEPS[index % len(STEPS)]
    else:
        path["workflow_id"] = _known_id(path["workflow_id"], WORKFLOWS)


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case,
                kwargs: dict[str, Any]) -> None:
    headers, query = case.headers, case.query
    if isinstance(headers, MutableMapping):  # a CaseInsensitiveDict
        if "Idempotency-Key" in headers:
            headers["Idempotency-Key"] = _unique_key(headers["Idempotency-Key"])
        if "X-Consistency-Token" in headers:
            headers["X-Consistency-Token"] = _real_token(headers["X-Consistency-Token"])
    if isinstance(case.body, MutableMapping) and "user_id" in case.body:
        case.body["user_id"] = _fresh_id(case.body["user_id"])
    if isinstance(query, MutableMapping) and "after" in query:
        query["after"] = _real_token(query["after"])
    if case.operation.path.startswith("/api/v1/commands/"):
        _references(case)


@schemathesis.hook
def after_call(context: schemathesis.HookContext, case: schemathesis.Case,
               response: Any) -> None:
    """Remember what a command created, so links that name it are followed as given."""
    if 200 <= response.status_code < 300 and \
            case.operation.path.startswith("/api/v1/commands/"):
        try:
            created = response.json().get("aggregate_id")
        except (ValueError, AttributeError):
            return
        if isinstance(created, str):
            _known.add(created.lower())

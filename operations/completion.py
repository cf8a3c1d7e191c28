"""The completion sagas and notification deliveries, for operators (`ringiflow saga`,
`ringiflow notifications`): every tenant's, through the operator role."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row

from infra.settings import ConfigError, Settings, libpq_url
from operations.audit import record_action
from saga.store import COLUMNS, of_row


def _connect(settings: Settings) -> psycopg.Connection[dict[str, Any]]:
    return psycopg.connect(libpq_url(settings.require("database_url")), autocommit=True,
                           row_factory=dict_row)


def sagas(settings: Settings, status: str | None = None, limit: int = 100) -> list[dict]:
    where, params = ("WHERE status = %s", (status, limit)) if status else ("", (limit,))
    with _connect(settings) as conn:
        rows = conn.execute(f"SELECT {COLUMNS} FROM saga.completions {where} "
                            "ORDER BY updated_at DESC LIMIT %s", params).fetchall()
    return [{"tenant_id": str(r["tenant_id"]), **of_row(r).view()} for r in rows]


def saga(settings: Settings, workflow: UUID) -> dict[str, Any]:
    with _connect(settings) as conn:
        rows = conn.execute(f"SELECT {COLUMNS} FROM saga.completions WHERE workflow_id = %s",
                            (workflow,)).fetchall()
    if not rows:
        raise ConfigError(f"no completion saga for workflow {workflow}: it is not approved, "
                          "or the saga worker has not seen its approval yet (`ringiflow lag`)")
    return {"tenant_id": str(rows[0]["tenant_id"]), **of_row(rows[0]).view()}


def retry(settings: Settings, workflow: UUID) -> dict[str, Any]:
    """Run a saga again: one out of attempts resumes at its step with a fresh budget; one
    that ended in `completion_failed` starts a new run from the first step (the workflow
    accepts completing again after a failure). A completed one is left alone."""
    current = saga(settings, workflow)
    if current["status"] == "completed":
        raise ConfigError(f"the completion of workflow {workflow} already succeeded; "
                          "nothing to retry")
    with _connect(settings) as conn:
        if current["status"] == "completion_failed":
            conn.execute("UPDATE saga.completions SET status = 'running', run = run + 1, "
                         "step = 'finalize', steps = '{}', attempts = 0, last_error = NULL, "
                         "finished_at = NULL, updated_at = clock_timestamp() "
                         "WHERE workflow_id = %s", (workflow,))
            outcome = "restarted"
        else:
            conn.execute("UPDATE saga.completions SET attempts = 0, "
                         "updated_at = clock_timestamp() WHERE workflow_id = %s", (workflow,))
            outcome = "resumed"
    record_action(settings, "saga.retry", "workflow-completion-saga", workflow, outcome,
                  details={"was": current["status"], "step": current["current_step"],
                           "last_error": current["last_error"]})
    return {"workflow_id": str(workflow), "outcome": outcome, "was": current["status"]}


def deliveries(settings: Settings, workflow: UUID | None = None,
               status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    clauses, params = [], []
    if workflow:
        clauses.append("workflow_id = %s")
        params.append(workflow)
    if status:
        clauses.append("status = %s")
        params.append(status)
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    with _connect(settings) as conn:
        return conn.execute(
            "SELECT tenant_id, notification_id, channel, recipient_id, workflow_id, kind, "
            "address, subject, status, attempts, last_error, first_attempt_at, sent_at FROM "
            f"notifications.deliveries {where} ORDER BY first_attempt_at DESC LIMIT %s",
            (*params, limit)).fetchall()

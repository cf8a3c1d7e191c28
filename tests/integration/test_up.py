"""`ringiflow up` as a user runs it: a real subprocess on free ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from uuid import uuid4

import psutil
import psycopg
import pytest

from infra.settings import libpq_url
from tests.helpers import listening_pid, up_fails_fast

pytestmark = pytest.mark.slow

COMPONENT_PORTS = ("RINGIFLOW_COMMAND_API_PORT", "RINGIFLOW_QUERY_API_PORT",
                   "RINGIFLOW_RELAY_PORT", "RINGIFLOW_WORKERS_PORT", "RINGIFLOW_CONSOLE_PORT")


class Up:
    def __init__(self, env: dict[str, str], flags: tuple[str, ...] = ()) -> None:
        self.env = env
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ringiflow", "up", *flags], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        self.output: list[str] = []

    # Generous: on a slow 2-core machine the two JVMs alone took 33 s, and seven Faust
    # workers then start at once; 60 s failed there though nothing was wrong.
    def wait_until_up(self, timeout: float = 180) -> float:
        started = time.monotonic()
        assert self.process.stdout is not None
        os.set_blocking(self.process.stdout.fileno(), False)
        while time.monotonic() - started < timeout:
            line = self.process.stdout.readline()
            if line:
                self.output.append(line)
                if "RingiFlow is up" in line:
                    time.sleep(0.3)
                    self.output.extend(self.process.stdout.readlines())
                    return time.monotonic() - started
                continue
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError("ringiflow up did not come up:\n" + "".join(self.output))

    @property
    def data_dir(self) -> Path:
        return Path(self.env["RINGIFLOW_DATA_DIR"])

    def runtime(self) -> dict:
        return json.loads((self.data_dir / "runtime.json").read_text())

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout)


@contextmanager
def running(env: dict[str, str], flags: tuple[str, ...] = ()) -> Iterator[Up]:
    up = Up(env, flags)
    try:
        up.wait_until_up()
        yield up
    finally:
        if up.process.poll() is None:
            up.stop()


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_gone(processes: list[psutil.Process], timeout: float = 15) -> list[psutil.Process]:
    _gone, alive = psutil.wait_procs(processes, timeout=timeout)
    return alive


def test_up_serves_every_endpoint_restarts_crashes_and_leaves_nothing_behind(
    cli_env: dict[str, str],
) -> None:
    marker = uuid4()
    # The API ports as flags (the children must get them too), the others from the env.
    flags = ("--command-port", cli_env["RINGIFLOW_COMMAND_API_PORT"],
             "--query-port", cli_env["RINGIFLOW_QUERY_API_PORT"])
    env = {k: v for k, v in cli_env.items()
           if k not in ("RINGIFLOW_COMMAND_API_PORT", "RINGIFLOW_QUERY_API_PORT")}
    with running(env, flags) as up:
        out = "".join(up.output)
        for var in COMPONENT_PORTS:
            base = f"http://127.0.0.1:{cli_env[var]}"
            assert base in out, f"{base} not printed"
            assert get(base + "/healthz")[0] == 200
            status, body = get(base + "/readyz")
            assert status == 200, body
        for name in ("PostgreSQL, embedded", "Redis, embedded", "Kafka (", "OpenSearch (",
                     "mail catcher, embedded", "caught mail"):
            assert name in out
        # Which broker and search server run, and why.
        assert "· Kafka: " in out and "· OpenSearch: " in out

        # A crashed child is restarted.
        victim = up.runtime()["pids"]["command-api"][0]
        psutil.Process(victim).kill()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pids = up.runtime()["pids"]["command-api"]
            if victim not in pids and all(psutil.pid_exists(p) for p in pids):
                break
            time.sleep(0.2)
        else:
            raise AssertionError("command API process was not restarted")
        url = f"http://127.0.0.1:{cli_env['RINGIFLOW_COMMAND_API_PORT']}/healthz"
        assert get(url)[0] == 200
        with psycopg.connect(libpq_url(up.runtime()["urls"]["database_url"])) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS public.up_marker (id uuid)")
            conn.execute("INSERT INTO public.up_marker VALUES (%s)", (marker,))
        children = up.descendants()
        assert len(children) >= 8
        assert up.stop(signal.SIGTERM) == 0
        assert wait_gone(children) == [], "processes left behind after SIGTERM"
        assert not (up.data_dir / "runtime.json").exists()

    # A second `up` reuses the Postgres data; a SIGKILLed supervisor takes its children along.
    with running(cli_env) as up:
        with psycopg.connect(libpq_url(up.runtime()["urls"]["database_url"])) as conn:
            assert conn.execute("SELECT count(*) FROM public.up_marker WHERE id = %s",
                                (marker,)).fetchone() == (1,)
        children = up.descendants()
        up.stop(signal.SIGKILL)
        assert wait_gone(children, timeout=30) == [], "orphans after SIGKILL"


def test_a_second_up_on_the_same_data_dir_is_refused(cli_env: dict[str, str]) -> None:
    with running(cli_env):
        second = subprocess.run([sys.executable, "-m", "ringiflow", "up"], env=cli_env,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert "already running" in second.stderr


@pytest.mark.parametrize("setting", ["RINGIFLOW_POSTGRES_PORT", "RINGIFLOW_COMMAND_API_PORT",
                                     "RINGIFLOW_KAFKA_PORT", "RINGIFLOW_OPENSEARCH_PORT"])
def test_a_port_in_use_fails_fast_naming_the_setting(
    cli_env: dict[str, str], setting: str
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cli_env[setting] = str(busy.getsockname()[1])
        up_fails_fast(cli_env, setting, "already in use")


@pytest.mark.parametrize(("setting", "url"), [
    ("RINGIFLOW_REDIS_URL", "redis://127.0.0.1:1/0"),
    ("RINGIFLOW_DATABASE_URL", "postgresql://u:hunter2@127.0.0.1:1/db"),
])
def test_an_unreachable_url_fails_fast_naming_the_setting(
    cli_env: dict[str, str], setting: str, url: str
) -> None:
    cli_env[setting] = url
    stderr = up_fails_fast(cli_env, setting, "unreachable")
    assert "hunter2" not in stderr  # secrets are redacted


@pytest.mark.parametrize(("binary_env", "setting"), [
    ("CALF_TANSU_BIN", "RINGIFLOW_KAFKA_BOOTSTRAP"),
    ("OSMEM_SERVER_BIN", "RINGIFLOW_OPENSEARCH_URL"),
])
def test_a_missing_binary_fails_fast_and_stops_what_started(
    cli_env: dict[str, str], tmp_path: Path, binary_env: str, setting: str
) -> None:
    cli_env |= {binary_env: str(tmp_path / "no-such-binary"),
                "RINGIFLOW_EMBEDDED_KAFKA": "tansu", "RINGIFLOW_EMBEDDED_OPENSEARCH": "osmem"}
    up_fails_fast(cli_env, setting, "no-such-binary")
    pgdata = str(Path(cli_env["RINGIFLOW_DATA_DIR"]) / "postgres")
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if pgdata in " ".join(p.info["cmdline"] or [])]
    assert wait_gone(leftovers, timeout=10) == []


def _lag(env: dict[str, str]) -> dict:
    result = subprocess.run([sys.executable, "-m", "ringiflow", "lag", "--json"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.stdout, result.stderr
    return json.loads(result.stdout)


def _processed(workers_url: str) -> float:
    with urllib.request.urlopen(workers_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ringiflow_events_processed_total{"))


def test_a_second_up_resumes_on_apache_kafka_without_reprojecting(
    cli_env: dict[str, str],
) -> None:
    """SIGTERM, then `up` again: topics, records and committed offsets are where
    they were, so no worker starts from scratch, and nothing is lost."""
    import asyncio

    import httpx

    from infra.jvm import find_jvm
    from tests.helpers import Tenant

    if find_jvm(None, 17) is None or os.environ.get("RINGIFLOW_EMBEDDED_KAFKA") == "tansu":
        pytest.skip("needs Java >= 17; the Apache Kafka lane runs it")
    cli_env["RINGIFLOW_EMBEDDED_KAFKA"] = "apache"
    commands = f"http://127.0.0.1:{cli_env['RINGIFLOW_COMMAND_API_PORT']}"
    workers = f"http://127.0.0.1:{cli_env['RINGIFLOW_WORKERS_PORT']}"

    async def load(secret: str, database_url: str, workflows: int) -> None:
        async with httpx.AsyncClient(base_url=commands, timeout=30) as client:
            tenant = await Tenant(client, secret, database_url).setup()
            for i in range(workflows):
                await tenant.create_workflow(f"再起動テスト {i}")

    def caught_up(up: Up) -> dict:
        env = cli_env | {"RINGIFLOW_DATABASE_URL": up.runtime()["urls"]["database_url"]}
        deadline = time.monotonic() + 90
        while True:
            report = _lag(env)
            if all(p["lag"] == 0 for p in report["partitions"]) and not report["breaches"]:
                return report
            assert time.monotonic() < deadline, report
            time.sleep(1)

    with running(cli_env) as up:
        assert "Kafka (Apache Kafka" in "".join(up.output)
        secret = (up.data_dir / "jwt-secret").read_text().strip()
        asyncio.run(load(secret, up.runtime()["urls"]["database_url"], 10))
        before = caught_up(up)
        assert _processed(workers) > 0
        assert up.stop(signal.SIGTERM) == 0

    committed = {(p["group"], p["topic"], p["partition"]): p["committed"]
                 for p in before["partitions"]}
    with running(cli_env) as up:
        # The groups resume at their commits over the very same records.
        after = _lag(cli_env | {"RINGIFLOW_DATABASE_URL": up.runtime()["urls"]["database_url"]})
        for p in after["partitions"]:
            key = (p["group"], p["topic"], p["partition"])
            assert p["committed"] == committed[key], key
            assert p["lag"] == 0, key
        time.sleep(3)
        assert _processed(workers) == 0, "a worker re-projected events after the restart"
        # And the restarted system still projects new commands.
        asyncio.run(load(secret, up.runtime()["urls"]["database_url"], 2))
        caught_up(up)
        assert _processed(workers) > 0


def _output_until(up: Up, needle: str, timeout: float) -> str:
    """Read `up`'s output until a line holds the needle."""
    assert up.process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = up.process.stdout.readline()
        if line:
            up.output.append(line)
            if needle in line:
                return line
            continue
        if up.process.poll() is not None:
            up.output.extend(up.process.stdout.readlines())
            return next((line for line in up.output if needle in line), "")
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not in the output:\n" + "".join(up.output[-40:]))


def _of_data_dir(data_dir: str) -> list[psutil.Process]:
    """Every process started for this data dir (by its environment or arguments)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("RINGIFLOW_DATA_DIR") == data_dir or \
                    any(data_dir in arg for arg in process.cmdline()):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_nothing_outlives_up_when_the_broker_dies_during_shutdown(
    cli_env: dict[str, str],
) -> None:
    """The fault probe's five Faust workers, ppid 1, retrying a dead broker for
    16 minutes: now every worker is SIGKILLed after a bounded grace."""
    with running(cli_env) as up:
        data_dir = str(up.data_dir)
        broker = listening_pid(up.runtime()["urls"]["kafka_bootstrap"])
        assert len(_of_data_dir(data_dir)) >= 10
        started = time.monotonic()
        up.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the children are stopping now
        psutil.Process(broker).kill()
        up.process.wait(120)
        elapsed = time.monotonic() - started
    alive = wait_gone(_of_data_dir(data_dir), timeout=5)
    assert alive == [], [p.cmdline() for p in alive]
    assert elapsed < 90, f"shutdown took {elapsed:.0f} s"


def test_a_degradable_server_that_cannot_come_back_degrades_and_the_rest_serves(
    cli_env: dict[str, str],
) -> None:
    import asyncio

    import httpx

    from tests.helpers import Tenant

    commands = f"http://127.0.0.1:{cli_env['RINGIFLOW_COMMAND_API_PORT']}"
    with running(cli_env) as up:
        runtime = up.runtime()
        # Redis dies and cannot start again: its working dir became a file.
        psutil.Process(listening_pid(runtime["urls"]["redis_url"])).kill()
        redis_dir = up.data_dir / "redis"
        import shutil

        shutil.rmtree(redis_dir)
        redis_dir.write_text("not a directory")
        died = _output_until(up, "embedded Redis died", 30)
        assert "degraded" in died and "redis.log" in died
        gave_up = _output_until(up, "gave up restarting embedded Redis", 90)
        assert "keeps running without" in gave_up
        assert up.process.poll() is None

        async def commands_work() -> None:
            async with httpx.AsyncClient(base_url=commands, timeout=30) as client:
                secret = (up.data_dir / "jwt-secret").read_text().strip()
                tenant = await Tenant(client, secret, runtime["urls"]["database_url"]).setup()
                await tenant.create_workflow("Redis なしで")

        asyncio.run(commands_work())
        assert get(commands + "/readyz")[0] == 200


def test_an_essential_server_that_cannot_come_back_stops_up_naming_it(
    cli_env: dict[str, str],
) -> None:
    with running(cli_env) as up:
        pg = psutil.Process(listening_pid(up.runtime()["urls"]["database_url"]))
        (up.data_dir / "postgres" / "PG_VERSION").write_text("1\n")  # no server starts on this
        pg.kill()
        died = _output_until(up, "embedded PostgreSQL died", 30)
        assert "the system waits for it" in died
        gave_up = _output_until(up, "gave up restarting embedded PostgreSQL", 120)
        assert "postgres.log" in gave_up
        assert up.process.wait(60) == 1

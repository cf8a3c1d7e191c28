"""Static checks of docker-compose.yml and the images it builds.

No Docker engine runs where the tests run, so these checks stand in for `docker compose up`:
the file must match the Compose schema, and the wiring Docker would only reveal at run time
(hosts, ports, health gates, commands, build paths) must be consistent.
Each check is a small function returning a list of problems; `[]` means fine.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from infra.settings import Settings
from ringiflow.components import COMPONENTS

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
SCHEMA_FILE = Path(__file__).resolve().parent / "data" / "compose-spec.json"

Doc = dict[str, Any]
Check = Callable[[Doc], list[str]]

INFRA = frozenset({"kafka", "postgres", "redis", "opensearch"})
APP = frozenset({"init", "command-api", "query-api", "relay", "workers", "console"})
ONE_SHOT = "init"
# The `ringiflow` verbs a container may run (the CLI's fixed verbs); `run` takes any component.
RINGIFLOW_VERBS = frozenset(
    {("migrate",), ("topics", "ensure")} | {("run", name) for name in COMPONENTS}
)
# Every `ringiflow run` process serves /healthz on its port setting's default.
HEALTH_PORTS = {
    name: Settings.model_fields[component.port_setting].default
    for name, component in COMPONENTS.items()
}
# Only the APIs are published; they must listen on all interfaces of their container.
PUBLISHED_APIS = ("command-api", "query-api", "console")
REQUIRED_APP_ENV = frozenset(
    {
        "RINGIFLOW_DATABASE_URL",
        "RINGIFLOW_REDIS_URL",
        "RINGIFLOW_KAFKA_BOOTSTRAP",
        "RINGIFLOW_OPENSEARCH_URL",
        "RINGIFLOW_JWT_SECRET",
        # The least-privilege roles log in over TCP, where Postgres demands a password.
        "RINGIFLOW_DB_ROLE_PASSWORD",
    }
)
# Where the stock images listen; Kafka's ports are read from its own listener settings.
IMAGE_PORTS = {"postgres": 5432, "redis": 6379, "opensearch": 9200}
DEFAULT_PORTS = {"postgresql": 5432, "postgres": 5432, "redis": 6379, "http": 80, "https": 443}
KAFKA_DEFAULT_PORT = 9092
# Each infra healthcheck must use the server's own probe, not merely "a process is up".
INFRA_PROBES = {
    "kafka": "kafka-broker-api-versions.sh",
    "postgres": "pg_isready",
    "redis": "redis-cli ping",
    "opensearch": "_cluster/health",
}
LISTENER = re.compile(r"^(?P<name>[A-Za-z0-9_]+)://(?P<host>[^:]*):(?P<port>\d+)$")
KUROMOJI_INSTALL = re.compile(r"opensearch-plugin install (--batch|-b) analysis-kuromoji\b")


# --------------------------------------------------------------------------- loading


@cache
def compose() -> Doc:
    # safe_load resolves the x-* anchors and `<<` merges exactly as Compose does.
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@cache
def compose_validator() -> jsonschema.Draft201909Validator:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    # The schema declares draft 2019-09, spelled "http://…/draft/2019-09/schema#", which
    # jsonschema does not recognise, so the class is named instead of using validator_for().
    # No format checker: Compose's "duration"/"ports" formats are its own, and jsonschema's
    # ISO-8601 "duration" would reject valid values such as "10s".
    return jsonschema.Draft201909Validator(schema)


def schema_errors(doc: Doc) -> list[str]:
    return [f"{error.json_path}: {error.message}" for error in compose_validator().iter_errors(doc)]


# --------------------------------------------------------------------------- accessors


def services(doc: Doc) -> dict[str, Doc]:
    return doc.get("services") or {}


def env_of(service: Doc) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", ...] form
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def dependencies(service: Doc) -> dict[str, str]:
    """Dependency name -> condition; the short list form means `service_started`."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def healthcheck_test(service: Doc) -> list[str]:
    """The healthcheck command as argv, or [] when there is none (or it is disabled)."""
    healthcheck = service.get("healthcheck") or {}
    if healthcheck.get("disable"):
        return []
    test = healthcheck.get("test") or []
    argv = ["CMD-SHELL", test] if isinstance(test, str) else list(test)
    return [] if argv[:1] == ["NONE"] else argv


def one_shot_services(doc: Doc) -> set[str]:
    """Services something waits on to *finish*: they need no healthcheck."""
    return {
        name
        for service in services(doc).values()
        for name, condition in dependencies(service).items()
        if condition == "service_completed_successfully"
    }


def build_files(service: Doc) -> tuple[Path, Path] | None:
    """(context dir, Dockerfile) of a built service, or None for a pulled image."""
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        build = {"context": build}
    context = ROOT / build.get("context", ".")
    return context, context / build.get("dockerfile", "Dockerfile")


def parse_listeners(value: str) -> dict[str, tuple[str, int]]:
    """Kafka listener list "NAME://host:port,..." -> {NAME: (host, port)}."""
    listeners = {}
    for item in value.split(","):
        match = LISTENER.match(item.strip())
        if match:
            listeners[match["name"]] = (match["host"], int(match["port"]))
    return listeners


def kafka_ports_for(service: Doc, host: str) -> set[int]:
    """Ports a client can bootstrap from as `host`: advertised under that name *and* bound.

    A client that bootstraps on another listener is redirected to that listener's advertised
    address (e.g. localhost:9094), which is wrong inside the compose network.
    """
    env = env_of(service)
    bound = parse_listeners(env.get("KAFKA_LISTENERS", ""))
    advertised = parse_listeners(env.get("KAFKA_ADVERTISED_LISTENERS", ""))
    return {
        port
        for name, (advertised_host, port) in advertised.items()
        if advertised_host == host and name in bound and bound[name][1] == port
    }


def listening_ports(doc: Doc, name: str) -> set[int]:
    service = services(doc)[name]
    if "KAFKA_PROCESS_ROLES" in env_of(service):
        return kafka_ports_for(service, name)
    return {IMAGE_PORTS[name]} if name in IMAGE_PORTS else set()


def endpoints(env: dict[str, str]) -> list[tuple[str, str, int | None]]:
    """(variable, host, port) for every RINGIFLOW_*_URL and for the Kafka bootstrap list."""
    found: list[tuple[str, str, int | None]] = []
    for key, value in env.items():
        if key == "RINGIFLOW_KAFKA_BOOTSTRAP":
            for server in value.split(","):
                host, _, port = server.strip().rpartition(":")
                found.append((key, host, int(port) if port.isdigit() else KAFKA_DEFAULT_PORT))
        elif re.fullmatch(r"RINGIFLOW_\w+_URL", key):
            url = urlsplit(value)
            scheme = url.scheme.split("+")[0]  # postgresql+psycopg:// -> postgresql
            found.append((key, url.hostname or "", url.port or DEFAULT_PORTS.get(scheme)))
    return found


def ringiflow_invocations(command: str | list[str] | None) -> list[list[str]]:
    """argv of every program a service command runs; `sh -c "a && b"` counts as two."""
    if not command:
        return []
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if argv[:2] == ["sh", "-c"]:
        return [shlex.split(part) for part in argv[2].split("&&")]
    return [argv]


def is_ringiflow_verb(argv: list[str]) -> bool:
    return argv[:1] == ["ringiflow"] and tuple(argv[1:]) in RINGIFLOW_VERBS


def container_port(mapping: str | int) -> int:
    """Container side of a published port: "127.0.0.1:8000:8000/tcp" -> 8000."""
    return int(str(mapping).rsplit(":", 1)[-1].split("/")[0])


# --------------------------------------------------------------------------- wiring checks


def undefined_dependencies(doc: Doc) -> list[str]:
    return [
        f"{name} -> {dep}"
        for name, service in services(doc).items()
        for dep in dependencies(service)
        if dep not in services(doc)
    ]


def missing_healthchecks(doc: Doc) -> list[str]:
    one_shot = one_shot_services(doc)
    return [
        f"{name} has no healthcheck"
        for name, service in services(doc).items()
        if name not in one_shot and not healthcheck_test(service)
    ]


def unhealthy_dependencies(doc: Doc) -> list[str]:
    # `service_healthy` on a service without a healthcheck makes `up` fail outright.
    return [
        f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
        for name, service in services(doc).items()
        for dep, condition in dependencies(service).items()
        if condition == "service_healthy"
        and dep in services(doc)
        and not healthcheck_test(services(doc)[dep])
    ]


def infra_probe_problems(doc: Doc) -> list[str]:
    return [
        f"{name} healthcheck does not use {probe!r}"
        for name, probe in INFRA_PROBES.items()
        if probe not in " ".join(healthcheck_test(services(doc).get(name, {})))
    ]


def endpoint_problems(doc: Doc) -> list[str]:
    problems = []
    for name, service in services(doc).items():
        for key, host, port in endpoints(env_of(service)):
            if host not in services(doc):
                problems.append(f"{name}: {key} points at {host!r}, which is no service")
            elif port not in listening_ports(doc, host):
                ports = sorted(listening_ports(doc, host))
                problems.append(f"{name}: {key} uses {host}:{port}, but {host} listens on {ports}")
    return problems


def app_env_problems(doc: Doc) -> list[str]:
    return [
        f"{name} lacks {key}"
        for name in sorted(APP)
        for key in sorted(REQUIRED_APP_ENV - env_of(services(doc).get(name, {})).keys())
    ]


def app_dependency_problems(doc: Doc) -> list[str]:
    problems = []
    for name in sorted(APP):
        deps = dependencies(services(doc).get(name, {}))
        problems += [
            f"{name} does not wait for {infra} to be healthy"
            for infra in sorted(INFRA)
            if deps.get(infra) != "service_healthy"
        ]
        if name != ONE_SHOT and deps.get(ONE_SHOT) != "service_completed_successfully":
            problems.append(f"{name} does not wait for {ONE_SHOT} to complete")
    return problems


def command_problems(doc: Doc) -> list[str]:
    problems = []
    for name in sorted(APP):
        command = services(doc).get(name, {}).get("command")
        # Relying on the image's CMD would hide which process a service runs.
        invocations = ringiflow_invocations(command) or [["<no command>"]]
        problems += [
            f"{name}: {shlex.join(argv)!r} is not a ringiflow verb"
            for argv in invocations
            if not is_ringiflow_verb(argv)
        ]
    return problems


def health_endpoint_problems(doc: Doc) -> list[str]:
    return [
        f"{name}: healthcheck does not probe :{port}/healthz"
        for name, port in HEALTH_PORTS.items()
        if f":{port}/healthz" not in " ".join(healthcheck_test(services(doc).get(name, {})))
    ]


def api_problems(doc: Doc) -> list[str]:
    problems = []
    for name in PUBLISHED_APIS:
        service = services(doc).get(name, {})
        port = HEALTH_PORTS[name]
        if port not in {container_port(mapping) for mapping in service.get("ports", [])}:
            problems.append(f"{name}: container port {port} is not published")
        # Bound to 127.0.0.1 the API passes its in-container healthcheck yet is unreachable.
        host_var = f"RINGIFLOW_{COMPONENTS[name].host_setting.upper()}"
        if env_of(service).get(host_var) != "0.0.0.0":
            problems.append(f"{name}: {host_var} is not 0.0.0.0")
    return problems


def settings_problems(doc: Doc) -> list[str]:
    """Feed each app service's RINGIFLOW_* values to the real Settings class.

    Settings ignores unknown variables, so a misspelt name would silently fall back to a
    default (or to the embedded servers); name them here instead.
    """
    problems = []
    for name in sorted(APP):
        values = {
            key.removeprefix("RINGIFLOW_").lower(): value
            for key, value in env_of(services(doc).get(name, {})).items()
            if key.startswith("RINGIFLOW_")
        }
        unknown = sorted(key for key in values if key not in Settings.model_fields)
        problems += [f"{name}: RINGIFLOW_{key.upper()} is not a setting" for key in unknown]
        try:
            Settings(**{key: value for key, value in values.items() if key not in unknown})
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            problems.append(f"{name}: Settings rejects the environment: {exc}")
    return problems


def published_port_problems(doc: Doc) -> list[str]:
    # Dev credentials everywhere: nothing may be reachable from other machines.
    return [
        f"{name}: port {mapping!r} is not bound to 127.0.0.1"
        for name, service in services(doc).items()
        for mapping in service.get("ports", [])
        if not str(mapping).startswith("127.0.0.1:")
    ]


def build_problems(doc: Doc) -> list[str]:
    problems = []
    for name, service in services(doc).items():
        files = build_files(service)
        if files is None:
            continue
        context, dockerfile = files
        if not context.is_dir():
            problems.append(f"{name}: build context {context} does not exist")
        elif not dockerfile.is_file():
            problems.append(f"{name}: Dockerfile {dockerfile} does not exist")
    return problems


def undeclared_volumes(doc: Doc) -> list[str]:
    declared = set(doc.get("volumes") or {})
    problems = []
    for name, service in services(doc).items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0] if isinstance(mount, str) else mount.get("source", "")
            is_named = source and not source.startswith((".", "/", "~", "$"))
            if is_named and source not in declared:
                problems.append(f"{name}: volume {source!r} is not declared")
    return problems


def python_healthcheck_problems(doc: Doc) -> list[str]:
    # A `python -c` probe that cannot even parse would keep its service unhealthy forever.
    problems = []
    for name, service in services(doc).items():
        argv = healthcheck_test(service)
        if "python" in argv and "-c" in argv:
            try:
                compile(argv[argv.index("-c") + 1], f"<{name} healthcheck>", "exec")
            except SyntaxError as exc:
                problems.append(f"{name}: healthcheck code does not parse: {exc}")
    return problems


def kafka_problems(doc: Doc) -> list[str]:
    env = env_of(services(doc).get("kafka", {}))
    problems = []
    if env.get("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "").lower() != "false":
        problems.append("kafka: topic auto-creation is not disabled")
    if not {"broker", "controller"} <= set(env.get("KAFKA_PROCESS_ROLES", "").split(",")):
        problems.append("kafka: KAFKA_PROCESS_ROLES is not broker,controller (KRaft)")
    quorum = {"KAFKA_CONTROLLER_QUORUM_VOTERS", "KAFKA_CONTROLLER_QUORUM_BOOTSTRAP_SERVERS"}
    if not quorum & env.keys():
        problems.append("kafka: no controller quorum configured")
    controller = env.get("KAFKA_CONTROLLER_LISTENER_NAMES", "")
    if not controller or controller not in parse_listeners(env.get("KAFKA_LISTENERS", "")):
        problems.append("kafka: the controller listener is not bound")
    if "CLUSTER_ID" not in env:
        problems.append("kafka: no CLUSTER_ID to format KRaft storage with")
    problems += [f"kafka: ZooKeeper setting {key}" for key in env if "ZOOKEEPER" in key]
    problems += [
        f"{name}: runs ZooKeeper"
        for name, service in services(doc).items()
        if "zookeeper" in f"{name} {service.get('image', '')}".lower()
    ]
    return problems


def opensearch_problems(doc: Doc) -> list[str]:
    service = services(doc).get("opensearch", {})
    env = env_of(service)
    problems = []
    files = build_files(service)
    if files is None or not files[1].is_file():
        problems.append("opensearch: not built from a Dockerfile")
    elif not KUROMOJI_INSTALL.search(files[1].read_text(encoding="utf-8")):
        problems.append(f"opensearch: {files[1]} does not install analysis-kuromoji")
    if env.get("discovery.type") != "single-node":
        problems.append("opensearch: discovery.type is not single-node")
    if "true" not in {env.get("DISABLE_SECURITY_PLUGIN"), env.get("plugins.security.disabled")}:
        problems.append("opensearch: security plugin is not disabled")
    return problems


def app_image_problems(doc: Doc) -> list[str]:
    problems = []
    dockerfiles = {files[1] for name in APP if (files := build_files(services(doc).get(name, {})))}
    for dockerfile in sorted(dockerfiles):
        if not dockerfile.is_file():
            continue  # reported by build_problems
        lines = [line.strip() for line in dockerfile.read_text(encoding="utf-8").splitlines()]
        users = [line.split()[1] for line in lines if line.startswith("USER ")]
        if not users or users[-1].split(":")[0] in {"root", "0"}:
            problems.append(f"{dockerfile}: the final stage runs as root")
        cmds = [json.loads(line[4:]) for line in lines if line.startswith("CMD [")]
        if not cmds or not is_ringiflow_verb(cmds[-1]):
            problems.append(f"{dockerfile}: default CMD is not a ringiflow verb")
    return problems


WIRING_CHECKS: tuple[Check, ...] = (
    undefined_dependencies,
    missing_healthchecks,
    unhealthy_dependencies,
    infra_probe_problems,
    endpoint_problems,
    app_env_problems,
    settings_problems,
    app_dependency_problems,
    command_problems,
    health_endpoint_problems,
    api_problems,
    published_port_problems,
    build_problems,
    undeclared_volumes,
    python_healthcheck_problems,
    kafka_problems,
    opensearch_problems,
    app_image_problems,
)


# --------------------------------------------------------------------------- tests


def test_vendored_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft201909Validator.check_schema(compose_validator().schema)


def test_compose_file_matches_the_compose_schema() -> None:
    assert schema_errors(compose()) == []


def test_compose_defines_exactly_the_expected_services() -> None:
    # A renamed or added service must be placed in INFRA or APP so the checks cover it.
    assert set(services(compose())) == INFRA | APP


@pytest.mark.parametrize("check", WIRING_CHECKS, ids=lambda check: check.__name__)
def test_wiring(check: Check) -> None:
    assert check(compose()) == []


# --------------------------------------------------------------------------- the checks can fail


def set_env(service: str, key: str, value: str) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        target = doc["services"][service]
        # Rebind instead of editing in place: YAML aliases share one dict between services.
        target["environment"] = {**env_of(target), key: value}

    return mutate


def set_key(service: str, key: str, value: Any) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        doc["services"][service][key] = value

    return mutate


def drop_key(service: str, key: str) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        del doc["services"][service][key]

    return mutate


def add_dependency(service: str, dep: str) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        target = doc["services"][service]
        target["depends_on"] = {**target["depends_on"], dep: {"condition": "service_healthy"}}

    return mutate


BREAKAGES = [
    pytest.param(
        add_dependency("workers", "nowhere"),
        undefined_dependencies,
        "workers -> nowhere",
        id="undefined dependency",
    ),
    pytest.param(
        drop_key("workers", "healthcheck"), missing_healthchecks, "workers", id="no healthcheck"
    ),
    pytest.param(
        drop_key("redis", "healthcheck"),
        unhealthy_dependencies,
        "redis has no healthcheck",
        id="waits on an unprobed service",
    ),
    pytest.param(
        set_key("postgres", "healthcheck", {"test": ["CMD", "true"]}),
        infra_probe_problems,
        "pg_isready",
        id="infra healthcheck that probes nothing",
    ),
    pytest.param(
        set_key("relay", "depends_on", {"kafka": {"condition": "service_healthy"}}),
        app_dependency_problems,
        "relay does not wait for init",
        id="app service not waiting for init",
    ),
    pytest.param(
        set_key("relay", "environment", {"RINGIFLOW_KAFKA_BOOTSTRAP": "kafka:9092"}),
        app_env_problems,
        "relay lacks RINGIFLOW_DATABASE_URL",
        id="app service without its settings",
    ),
    pytest.param(
        set_env("relay", "RINGIFLOW_DATABASE_URL", "postgresql://u@db/x"),
        endpoint_problems,
        "'db', which is no service",
        id="unknown database host",
    ),
    pytest.param(
        set_env("relay", "RINGIFLOW_DATABASE_URL", "postgresql://u@postgres:5433/x"),
        endpoint_problems,
        "postgres:5433",
        id="wrong postgres port",
    ),
    pytest.param(
        set_env("relay", "RINGIFLOW_KAFKA_BOOTSTRAP", "kafka:9094"),
        endpoint_problems,
        "kafka:9094",
        id="kafka host listener used from inside",
    ),
    pytest.param(
        set_env("query-api", "RINGIFLOW_QUERY_API_HOST", "127.0.0.1"),
        api_problems,
        "RINGIFLOW_QUERY_API_HOST",
        id="api bound to loopback",
    ),
    pytest.param(
        set_env("relay", "RINGIFLOW_DATABSE_URL", "postgresql://u@postgres:5432/x"),
        settings_problems,
        "RINGIFLOW_DATABSE_URL is not a setting",
        id="misspelt setting",
    ),
    pytest.param(
        set_env("relay", "RINGIFLOW_REDIS_URL", "http://redis:6379"),
        settings_problems,
        "Settings rejects",
        id="setting of the wrong form",
    ),
    pytest.param(
        set_key("relay", "healthcheck", {"test": ["CMD", "true"]}),
        health_endpoint_problems,
        ":8002/healthz",
        id="healthcheck that probes nothing",
    ),
    pytest.param(
        set_key("workers", "command", ["ringiflow", "run", "everything"]),
        command_problems,
        "run everything",
        id="unknown verb",
    ),
    pytest.param(
        set_key("command-api", "ports", ["8000:8000"]),
        published_port_problems,
        "'8000:8000'",
        id="port on all interfaces",
    ),
    pytest.param(
        set_key("postgres", "volumes", ["pgdata:/var/lib/postgresql"]),
        undeclared_volumes,
        "'pgdata'",
        id="undeclared named volume",
    ),
    pytest.param(
        set_key("workers", "healthcheck", {"test": ["CMD", "python", "-c", "import urllib;("]}),
        python_healthcheck_problems,
        "does not parse",
        id="python probe with a syntax error",
    ),
    pytest.param(
        set_key("opensearch", "build", {"context": "docker/nope"}),
        build_problems,
        "docker/nope",
        id="missing build context",
    ),
    pytest.param(
        set_env("kafka", "KAFKA_AUTO_CREATE_TOPICS_ENABLE", "true"),
        kafka_problems,
        "auto-creation",
        id="auto topic creation",
    ),
    pytest.param(
        set_env("kafka", "KAFKA_ZOOKEEPER_CONNECT", "zk:2181"),
        kafka_problems,
        "KAFKA_ZOOKEEPER_CONNECT",
        id="zookeeper mode",
    ),
    pytest.param(
        set_key("opensearch", "build", {"context": ".", "dockerfile": "Dockerfile"}),
        opensearch_problems,
        "analysis-kuromoji",
        id="no kuromoji",
    ),
]


@pytest.mark.parametrize(("mutate", "check", "expected"), BREAKAGES)
def test_wiring_checks_flag_a_broken_document(
    mutate: Callable[[Doc], None], check: Check, expected: str
) -> None:
    broken = copy.deepcopy(compose())
    assert check(broken) == [], "the unbroken document must pass first"
    mutate(broken)
    problems = check(broken)
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        pytest.param(
            set_key("redis", "helthcheck", {"test": ["CMD", "true"]}),
            "$.services.redis: 'helthcheck'",
            id="unknown key",
        ),
        pytest.param(
            set_key("relay", "depends_on", {"kafka": {"condition": "service_ready"}}),
            "$.services.relay.depends_on",
            id="unknown condition",
        ),
        pytest.param(
            set_key("relay", "ports", "8000:8000"), "$.services.relay.ports", id="ports not a list"
        ),
    ],
)
def test_schema_rejects_invalid_syntax(mutate: Callable[[Doc], None], expected: str) -> None:
    broken = copy.deepcopy(compose())
    mutate(broken)
    errors = schema_errors(broken)
    assert any(expected in error for error in errors), errors


# --- one source of truth: the embedded servers and compose take the same values -----


def test_compose_kafka_takes_the_embedded_brokers_settings() -> None:
    from infra.kafka import BROKER_CONFIG
    from infra.kafka_broker import KAFKA_VERSION

    kafka = compose()["services"]["kafka"]
    assert kafka["image"] == f"apache/kafka:{KAFKA_VERSION}"
    env = {k: str(v) for k, v in kafka["environment"].items()}
    for key, value in BROKER_CONFIG.items():
        name = "KAFKA_" + key.upper().replace(".", "_")
        assert env.get(name) == value, f"{name} is {env.get(name)!r}, the embedded broker's {value}"


def test_compose_opensearch_takes_the_embedded_nodes_version_plugins_and_settings() -> None:
    from infra.opensearch_node import DISTRIBUTIONS, NODE_SETTINGS

    dockerfile = (ROOT / "docker" / "opensearch" / "Dockerfile").read_text()
    newest = max(DISTRIBUTIONS, key=lambda v: tuple(int(p) for p in v.split(".")))
    assert f"ARG OPENSEARCH_VERSION={newest}\n" in dockerfile
    assert "opensearch-plugin install --batch analysis-kuromoji" in dockerfile
    env = {k: str(v) for k, v in compose()["services"]["opensearch"]["environment"].items()}
    for key, value in NODE_SETTINGS.items():
        assert env.get(key) == value, key


def test_topics_and_index_come_from_one_catalogue_on_every_server() -> None:
    """Neither the embedded servers nor compose define a topic or an index: both go
    through `ringiflow topics ensure` (contract.all_topics) and the indexer's own
    index body, so partitions, retention, cleanup and analyzers cannot drift."""
    for path in (ROOT / "infra" / "kafka_broker.py", ROOT / "infra" / "opensearch_node.py",
                 COMPOSE_FILE):
        text = path.read_text()
        assert "retention.ms" not in text and "num.partitions" not in text, path
        assert "kuromoji_tokenizer" not in text, path

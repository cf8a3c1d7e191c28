"""Embedded OpenSearch: one real node assembled from Maven Central artifacts
(infra/jvm/opensearch-*.pom.xml) into the cache, with analysis-kuromoji.

3.8.0 runs on a JDK >= 21 when one is installed, 2.19.6 on Java 17 otherwise.
OpenSearch refuses to run as root, so as root it runs as an unprivileged system
user, as the embedded PostgreSQL does. The assembly in the cache is shared and
read-only; each data dir has its own config, data and logs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from infra import jvm
from infra.servers import (
    EmbeddedError,
    Server,
    ensure_system_user,
    free_port,
    open_path_for_others,
    spawn,
    wait_ready,
)

SYSTEM_USER = "ringiflow-search"
FALLBACK = "set RINGIFLOW_EMBEDDED_OPENSEARCH=osmem for the in-memory stand-in"
HINT = f"see its log; or {FALLBACK}, or RINGIFLOW_OPENSEARCH_URL for an external server"
HEAP = "512m"
# Node settings RingiFlow relies on, for the embedded node and docker-compose.yml
# alike (tests/test_compose.py compares them).
NODE_SETTINGS = {
    # The indexer creates its index with mappings; a write to a missing alias must fail,
    # not create an index with guessed mappings.
    "action.auto_create_index": "false",
}


@dataclass(frozen=True)
class Distribution:
    version: str
    min_java: int
    java_version_in_descriptors: int
    kuromoji_version: str
    kuromoji_class: str = "org.opensearch.plugin.analysis.kuromoji.AnalysisKuromojiPlugin"

    @property
    def pom(self) -> Path:
        return jvm.POMS / f"opensearch-{self.version.split('.')[0]}.pom.xml"

    def target(self, cache_dir: Path) -> Path:
        return cache_dir / f"opensearch-{self.version}"

    def home(self, cache_dir: Path) -> Path:
        return self.target(cache_dir) / f"opensearch-{self.version}"


DISTRIBUTIONS = {
    "3.8.0": Distribution("3.8.0", 21, 21, "3.8.0"),
    "2.19.6": Distribution("2.19.6", 17, 11, "2.16.0"),
}

# 2.19's integ-test-zip lacks these modules; its jars are laid out with these descriptors.
MODULES_2X = {
    "lang-painless": ("org.opensearch.painless.PainlessPlugin",
                      "An easy, safe and fast scripting language for OpenSearch", ""),
    "analysis-common": ("org.opensearch.analysis.common.CommonAnalysisPlugin",
                        'Adds "built in" analyzers to OpenSearch.', "lang-painless"),
    "mapper-extras": ("org.opensearch.index.mapper.MapperExtrasPlugin",
                      "Adds advanced field mappers", ""),
    "reindex": ("org.opensearch.index.reindex.ReindexPlugin",
                "The Reindex module adds APIs to reindex from one index to another.", ""),
}
POLICIES_2X = {
    "lang-painless": """grant {
  permission java.lang.RuntimePermission "createClassLoader";
  permission java.lang.RuntimePermission "getClassLoader";
};
""",
    "reindex": """grant {
  permission java.net.SocketPermission "*", "connect";
};
grant codeBase "${codebase.opensearch-rest-client}" {
  permission java.net.NetPermission "getProxySelector";
};
grant codeBase "${codebase.httpasyncclient}" {
  permission java.net.NetPermission "getProxySelector";
};
""",
}


def _descriptor(folder: Path, dist: Distribution, name: str, classname: str,
                description: str, extended: str = "") -> None:
    (folder / "plugin-descriptor.properties").write_text(
        f"description={description}\nversion={dist.version}\nname={name}\n"
        f"classname={classname}\njava.version={dist.java_version_in_descriptors}\n"
        f"opensearch.version={dist.version}\ncustom.foldername=\n"
        f"extended.plugins={extended}\nhas.native.controller=false\n")


def _finish_assembly(dist: Distribution, home: Path) -> None:
    for script in (home / "bin").iterdir():  # the unarchiver may drop exec bits
        script.chmod(0o755)
    if dist.version.startswith("2."):
        for name, (classname, description, extended) in MODULES_2X.items():
            _descriptor(home / "modules" / name, dist, name, classname, description, extended)
        for name, policy in POLICIES_2X.items():
            (home / "modules" / name / "plugin-security.policy").write_text(policy)
    _descriptor(home / "plugins" / "analysis-kuromoji", dist, "analysis-kuromoji",
                dist.kuromoji_class, "Japanese (kuromoji) analysis for OpenSearch.")
    for path in [home, *home.rglob("*")]:  # readable by the unprivileged server user
        mode = path.stat().st_mode
        path.chmod(mode | (0o055 if path.is_dir() or mode & 0o100 else 0o044))


def assembly(dist: Distribution, cache_dir: Path, maven_settings: Path | None) -> Path:
    jvm.resolve(what=f"OpenSearch {dist.version}", pom=dist.pom,
                target=dist.target(cache_dir),
                goals=[f"{jvm.DEPENDENCY_PLUGIN}:unpack@dist",
                       f"{jvm.DEPENDENCY_PLUGIN}:copy@plugins"],
                cache_dir=cache_dir, maven_settings=maven_settings, fallback=FALLBACK,
                finish=lambda _: _finish_assembly(dist, dist.home(cache_dir)))
    return dist.home(cache_dir)


def is_cached(dist: Distribution, cache_dir: Path) -> bool:
    return jvm.is_resolved(dist.target(cache_dir), dist.pom)


def choose(version: str, java_home: Path | None) -> tuple[Distribution, jvm.Jvm] | None:
    """The distribution to run and its JVM: 3.x on the newest JDK >= 21, else 2.19
    on Java 17 (2.19 is not built for the newest JDKs)."""
    wanted = [DISTRIBUTIONS[version]] if version != "auto" else list(DISTRIBUTIONS.values())
    for dist in wanted:
        if dist.min_java >= 21:
            runtime = jvm.find_jvm(java_home, dist.min_java, prefer="highest")
        else:
            runtime = jvm.find_jvm(java_home, dist.min_java, prefer="lowest")
            if runtime is not None and runtime.major > 21:
                runtime = None
        if runtime is not None:
            return dist, runtime
    return None


def _jvm_options(home: Path, data: Path, logs: Path) -> str:
    """The distribution's options with every relative path made absolute: the
    defaults write gc logs and heap dumps under the (read-only) home."""
    text = (home / "config" / "jvm.options").read_text()
    text = re.sub(r"^-Xm[sx]\S+\n", "", text, flags=re.MULTILINE)
    text = text.replace("file=logs/gc.log", f"file={logs}/gc.log")
    text = text.replace("-XX:HeapDumpPath=data", f"-XX:HeapDumpPath={data}")
    text = text.replace("-XX:ErrorFile=logs/", f"-XX:ErrorFile={logs}/")
    text = text.replace("-javaagent:agent/", f"-javaagent:{home}/agent/")
    # C1 only: on a small machine the full JIT's compiler threads took ~20 % of a core
    # for minutes of load, and the node's own work is light (ADR 0006). A long-lived
    # node that wants peak speed sets OPENSEARCH_JAVA_OPTS=-XX:TieredStopAtLevel=4.
    return text + f"-Xms{HEAP}\n-Xmx{HEAP}\n-XX:TieredStopAtLevel=1\n"


def opensearch_yml(port: int, transport_port: int, data: Path, logs: Path) -> str:
    return "\n".join([
        "cluster.name: ringiflow",
        "node.name: ringiflow-1",
        "discovery.type: single-node",
        "network.host: 127.0.0.1",
        f"http.port: {port}",
        f"transport.port: {transport_port}",
        f"path.data: {data}",
        f"path.logs: {logs}",
        "bootstrap.memory_lock: false",
        # A development disk that fills up must not turn every index read-only.
        "cluster.routing.allocation.disk.threshold_enabled: false",
        *(f"{key}: {value}" for key, value in NODE_SETTINGS.items()),
        "",
    ])


def start_opensearch_node(data_dir: Path, port: int, timeout: float, dist: Distribution,
                          runtime: jvm.Jvm, cache_dir: Path,
                          maven_settings: Path | None = None) -> Server:
    home = assembly(dist, cache_dir, maven_settings)
    base = data_dir / "opensearch"
    # Its own logs live beside its data, in a folder its (system) user owns: the
    # data dir's logs/ is 0700, open to the supervisor's user only.
    config, data, logs = base / "config", base / "data", base / "logs"
    for folder in (config, data, logs):
        folder.mkdir(parents=True, exist_ok=True)
    for name in ("log4j2.properties", "jvm.options.d"):
        source = home / "config" / name
        if source.is_dir():
            shutil.copytree(source, config / name, dirs_exist_ok=True)
        else:
            shutil.copy2(source, config / name)
    (config / "jvm.options").write_text(_jvm_options(home, data, logs))
    (config / "opensearch.yml").write_text(opensearch_yml(port, free_port(), data, logs))
    run_as: dict[str, object] = {}
    if os.geteuid() == 0:
        user = ensure_system_user(SYSTEM_USER)
        for path in (home, data_dir):
            open_path_for_others(path)
        for folder in (base, logs):
            for path in [folder, *folder.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    env = {"PATH": "/usr/bin:/bin", "HOME": str(base), "OPENSEARCH_JAVA_HOME": str(runtime.home),
           "OPENSEARCH_PATH_CONF": str(config), "LANG": "C.UTF-8",
           # Read after jvm.options, so its flags win.
           "OPENSEARCH_JAVA_OPTS": os.environ.get("OPENSEARCH_JAVA_OPTS", "")}
    log_path = data_dir / "logs" / "opensearch.log"
    process = spawn("OpenSearch", [str(home / "bin" / "opensearch")], log_path, HINT,
                     env=env, cwd=str(base), **run_as)
    url = f"http://127.0.0.1:{port}"
    server = Server(f"OpenSearch ({dist.version})", url, process, log_path,
                    stop_signal=signal.SIGTERM)

    def ready() -> bool:
        health = f"{url}/_cluster/health?wait_for_status=yellow&timeout=1s"
        with urllib.request.urlopen(health, timeout=2) as resp:
            return resp.status == 200

    wait_ready(server, ready, timeout, HINT)
    return server


def check_choice(choice: tuple[Distribution, jvm.Jvm] | None, version: str,
                 java_home: Path | None) -> tuple[Distribution, jvm.Jvm]:
    if choice is not None:
        return choice
    need = ("a JDK >= 21 for OpenSearch 3.8.0 or Java 17-21 for 2.19.6" if version == "auto"
            else f"Java >= {DISTRIBUTIONS[version].min_java} for OpenSearch {version}")
    setting = f"RINGIFLOW_JAVA_HOME={java_home}" if java_home else "PATH and /usr/lib/jvm"
    raise EmbeddedError(
        f"RINGIFLOW_EMBEDDED_OPENSEARCH=opensearch needs {need}, and {setting} has "
        f"{jvm.installed_jvms(java_home)}; install one (`apt-get install "
        f"openjdk-17-jre-headless`), point RINGIFLOW_JAVA_HOME at one, or {FALLBACK}"
    )

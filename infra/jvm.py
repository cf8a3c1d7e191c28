"""Java and Maven for the embedded JVM servers (Apache Kafka, OpenSearch).

Finds the JVMs installed here and their major versions, and resolves a server's
artifacts from Maven Central once into RingiFlow's cache with a pom kept in
`infra/jvm/`; later starts use the cache and need neither Maven nor a network.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

POMS = Path(__file__).parent / "jvm"
# Goals by full coordinates: a bare prefix needs plugin metadata from the network first,
# and then fails with "No plugin found for prefix" instead of the real cause.
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
READY_MARKER = ".ringiflow-resolved"  # holds the pom's hash: a changed pom resolves again


class JvmError(RuntimeError):
    """Java or Maven is missing, too old or failing; the message names the setting."""


@dataclass(frozen=True)
class Jvm:
    home: Path
    major: int
    version: str

    @property
    def java(self) -> Path:
        return self.home / "bin" / "java"

    def describe(self) -> str:
        return f"Java {self.version} at {self.home}"


_VERSION = re.compile(r'version "(\d+)(?:\.(\d+))?[^"]*"')


@cache
def probe(home: Path) -> Jvm | None:
    """The JVM in `home`, or None when there is none that runs."""
    java = home / "bin" / "java"
    if not os.access(java, os.X_OK):
        return None
    try:
        out = subprocess.run([str(java), "-version"], capture_output=True, text=True,
                             timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION.search(out)
    if not match:
        return None
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8.0_x" is Java 8
        major = int(match.group(2))
    return Jvm(home, major, match.group(0).split('"')[1])


def candidates(java_home: Path | None) -> list[Path]:
    """Where to look: only RINGIFLOW_JAVA_HOME when set, else JAVA_HOME, the `java`
    on PATH and every JVM under /usr/lib/jvm."""
    if java_home is not None:
        return [java_home]
    found: list[Path] = []
    if os.environ.get("JAVA_HOME"):
        found.append(Path(os.environ["JAVA_HOME"]))
    on_path = shutil.which("java")
    if on_path:
        found.append(Path(os.path.realpath(on_path)).parent.parent)
    jvm_root = Path("/usr/lib/jvm")
    if jvm_root.is_dir():
        found.extend(sorted(p for p in jvm_root.iterdir() if p.is_dir()))
    unique: dict[str, Path] = {}
    for path in found:
        unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())


def find_jvm(java_home: Path | None, minimum: int, prefer: str = "lowest") -> Jvm | None:
    """The lowest (or highest) JVM at least `minimum`; None when there is none."""
    jvms = [j for j in (probe(p) for p in candidates(java_home)) if j and j.major >= minimum]
    if not jvms:
        return None
    return (min if prefer == "lowest" else max)(jvms, key=lambda j: j.major)


def installed_jvms(java_home: Path | None) -> str:
    """A short list for error messages: what was found, or where we looked."""
    jvms = [j for j in (probe(p) for p in candidates(java_home)) if j]
    if jvms:
        return ", ".join(j.describe() for j in jvms)
    where = ", ".join(str(p) for p in candidates(java_home)) or "PATH, JAVA_HOME, /usr/lib/jvm"
    return f"no JVM found (looked in {where})"


def maven() -> str | None:
    return shutil.which("mvn")


# --- the artifact cache ------------------------------------------------------


def pom_hash(pom: Path) -> str:
    return hashlib.sha256(pom.read_bytes()).hexdigest()[:16]


def is_resolved(target: Path, pom: Path) -> bool:
    marker = target / READY_MARKER
    return marker.is_file() and marker.read_text().strip() == pom_hash(pom)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One resolution of a cache folder at a time, across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _folder_mb(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total / 1e6


def resolve(*, what: str, pom: Path, target: Path, goals: list[str], cache_dir: Path,
            maven_settings: Path | None, fallback: str,
            finish: Callable[[Path], None] | None = None, timeout_s: float = 900) -> Path:
    """Run Maven on `pom` once so that `target` holds its artifacts; idempotent.

    Prints one progress line every few seconds (first run only): the download is
    tens to hundreds of MB. `finish` completes the assembly under the same lock;
    only then is the target marked resolved. `fallback` names what the user can
    set instead.
    """
    with _locked(target.with_name(target.name + ".lock")):
        if is_resolved(target, pom):
            return target
        mvn = maven()
        if mvn is None:
            raise JvmError(
                f"{what} is not in the cache ({target}) and Maven (`mvn`) is not on PATH to "
                f"fetch it from Maven Central; install Maven (`apt-get install maven`) or "
                f"{fallback}"
            )
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        repo = cache_dir / "m2"
        # Maven writes its bookkeeping beside the pom: run a copy in the cache, so the
        # installed package (maybe read-only) stays untouched.
        work_pom = target.with_name(target.name + ".pom.xml")
        shutil.copyfile(pom, work_pom)
        args = [mvn, "-B", "-q", "-Dstyle.color=never", "-f", str(work_pom),
                f"-Dmaven.repo.local={repo}",
                f"-Dtarget={target}", *goals]
        if maven_settings is not None:
            if not maven_settings.is_file():
                raise JvmError(f"RINGIFLOW_MAVEN_SETTINGS={maven_settings} is not a file; "
                               "point it at a Maven settings.xml or unset it")
            args[1:1] = ["-s", str(maven_settings)]
        log_path = target.with_name(target.name + ".mvn.log")
        print(f"· {what}: fetching from Maven Central into {target} (first run only)",
              file=sys.stderr, flush=True)
        started = time.monotonic()
        done = threading.Event()

        def progress() -> None:
            while not done.wait(5):
                print(f"· {what}: {_folder_mb(repo) + _folder_mb(target):.0f} MB after "
                      f"{time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)

        reporter = threading.Thread(target=progress, daemon=True)
        reporter.start()
        try:
            with open(log_path, "wb") as log:
                result = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise JvmError(f"Maven did not finish fetching {what} within {timeout_s:.0f} s "
                           f"(log {log_path}); check the network, or {fallback}") from None
        finally:
            done.set()
        if result.returncode != 0:
            lines = re.sub(r"\x1b\[[0-9;]*m", "", log_path.read_text(errors="replace")).splitlines()
            errors = [line for line in lines if line.startswith("[ERROR]") and line[8:].strip()]
            tail = "\n".join((errors or lines)[:3])
            raise JvmError(
                f"Maven could not fetch {what} (exit {result.returncode}; log {log_path}):\n"
                f"{tail}\nCheck that Maven Central (or the mirror in RINGIFLOW_MAVEN_SETTINGS) "
                f"is reachable, or {fallback}"
            )
        if finish is not None:
            finish(target)
        (target / READY_MARKER).write_text(pom_hash(pom))
        print(f"· {what}: fetched in {time.monotonic() - started:.0f} s", file=sys.stderr,
              flush=True)
        return target

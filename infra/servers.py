"""What every embedded server shares: how it is started (a child with a parent-death
signal and a private log), waited for, stopped and told apart from a busy port, and the
system users the servers that refuse root run as.

Every server is started with a parent-death signal, so even a SIGKILLed `ringiflow up`
leaves no orphan behind."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import pwd
import random
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from infra.logsafe import open_log
from infra.settings import (
    ConfigError,
)

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
PRIVATE_UMASK = 0o077  # files 0600, directories 0700



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


_LISTEN_PORTS = (15000, 32000)  # below any usual ephemeral range (Linux: 32768-60999)
_handed_out: set[int] = set()


@functools.cache
def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free port to listen on, chosen below the kernel's ephemeral range.

    Asking the kernel for port 0 hands out an ephemeral port, and between closing that
    probe and the server's own bind any outgoing connection on the machine may take the
    same port as its local end ("Address already in use" at start-up, seen in CI). Ports
    below the range are never given to outgoing connections. A port handed out once is
    not handed out again by this process, so a caller that takes five in a row gets five."""
    low, high = _LISTEN_PORTS[0], min(_LISTEN_PORTS[1], _ephemeral_floor() - 1)
    for _ in range(200 if high - low >= 1000 else 0):
        port = random.randint(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    # A machine whose ephemeral range starts low, or whose low ports are all taken:
    # the kernel's choice, as before.
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


def port_open(port: int) -> bool:
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
        stop_within(self.process, self.name, timeout, self.stop_signal)


def stop_within(process: subprocess.Popen, name: str, grace_s: float,
                sig: int = signal.SIGTERM) -> None:
    """`sig`, then SIGKILL once the grace period is over: bounded, whatever it does."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %.0f s; killing it", name, grace_s)
        process.kill()
        process.wait()


def spawn(name: str, args: list[str], log_path: Path, hint: str,
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


def wait_ready(server: Server, check: Callable[[], bool], timeout: float, hint: str) -> None:
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


def open_path_for_others(path: Path) -> None:
    """Let the unprivileged postgres user traverse to its binaries and data."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

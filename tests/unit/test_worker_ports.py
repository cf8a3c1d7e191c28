"""`run workers` chooses its workers' ports before it binds its own: none of them
may be its own port, nor one given to another worker (CI once saw the workflow
projector fail to bind on every restart because it had drawn the supervisor's
port)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from infra import servers
from infra.settings import Settings
from streams import app


def test_no_worker_draws_the_supervisors_port_or_anothers(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, workers_port=52071)  # type: ignore[call-arg]
    # The operating system hands out the supervisor's port first, then repeats.
    draws = iter([52071, 40001, 40001, 52071, *range(40002, 40100)])
    monkeypatch.setattr(app, "free_port", lambda: next(draws))
    taken = {settings.workers_port}
    ports = [app.worker(group, settings, taken).port for group in ("a", "b", "c")]
    assert ports == [40001, 40002, 40003]
    assert 52071 not in ports


def test_a_free_port_is_never_one_an_outgoing_connection_can_take() -> None:
    """CI saw `ringiflow up` fail with "Address already in use": the port it had been
    handed (a kernel-chosen ephemeral one) was taken by some outgoing connection before
    the component bound it. Ports to listen on come from below the ephemeral range, and
    one process is never handed the same port twice."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [servers.free_port() for _ in range(200)]
    assert all(port < low for port in ports), [p for p in ports if p >= low]
    assert len(set(ports)) == len(ports)
    with socket.socket() as probe:  # and one is really free to bind
        probe.bind(("127.0.0.1", ports[-1]))


def test_a_machine_whose_ephemeral_range_starts_low_still_gets_free_ports(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(servers, "_ephemeral_floor", lambda: 1024)
    port = servers.free_port()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))

"""`run workers` chooses its workers' ports before it binds its own: none of them
may be its own port, nor one given to another worker (CI once saw the workflow
projector fail to bind on every restart because it had drawn the supervisor's
port)."""

from __future__ import annotations

from pathlib import Path

import pytest

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

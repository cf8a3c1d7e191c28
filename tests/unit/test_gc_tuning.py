"""The processes' collector settings (infra.gc_tuning): what is alive at startup is
never walked again, and full collections are rare."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from infra import gc_tuning


@pytest.fixture
def restored() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_startup_objects_are_frozen_and_collections_are_spaced_out(restored: None) -> None:
    built_at_startup = [{"route": i} for i in range(1000)]
    gc_tuning.settle()
    assert gc.get_freeze_count() >= len(built_at_startup)
    assert gc.get_threshold() == gc_tuning.THRESHOLDS
    assert gc.get_threshold()[0] > 700  # CPython's default

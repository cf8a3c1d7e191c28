"""observe_many puts a batch into a histogram exactly as observing each value would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from infra.telemetry import HOP_BUCKETS, observe_many

AMOUNTS = [0.0, 0.0005, 0.001, 0.0010001, 0.02, 0.75, 29.9, 30.0, 31.0, 1e9]


def exposition(fill) -> bytes:  # type: ignore[no-untyped-def]
    registry = CollectorRegistry()
    histogram = Histogram("hop_seconds", "a hop", ["group"], buckets=HOP_BUCKETS,
                          registry=registry)
    fill(histogram.labels("g"))
    return b"\n".join(line for line in generate_latest(registry).splitlines()
                      if b"_created" not in line)


def test_a_batch_observed_at_once_reads_as_one_by_one() -> None:
    def one_by_one(child) -> None:  # type: ignore[no-untyped-def]
        for amount in AMOUNTS:
            child.observe(amount)

    assert exposition(lambda child: observe_many(child, AMOUNTS)) == exposition(one_by_one)


def test_nothing_observed_changes_nothing() -> None:
    assert exposition(lambda child: observe_many(child, [])) == exposition(lambda child: None)

"""Latency buckets shared by every per-hop histogram, so one dashboard (or
`benchmarks.freshness`) can read the hops side by side; and a batch's observations
put into a histogram at once."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

# Seconds: fine below 50 ms, where command -> visible should live.
HOP_BUCKETS = (.001, .002, .003, .005, .0075, .01, .015, .02, .03, .05, .075, .1, .15, .25,
               .5, 1, 2.5, 5, 10, 30)


def observe_many(histogram: Any, amounts: Iterable[float]) -> None:
    """`histogram.observe(a)` for each amount, as one update per bucket: a worker
    observes several histograms per event, and prometheus_client's observe takes a
    lock and walks the buckets each time. Reads the labelled child's bucket bounds
    (`_upper_bounds`); falls back to observing one by one if they are not there."""
    bounds = getattr(histogram, "_upper_bounds", None)
    if bounds is None:
        for amount in amounts:
            histogram.observe(amount)
        return
    counts = [0] * len(bounds)
    total = 0.0
    for amount in amounts:
        counts[bisect_left(bounds, amount)] += 1  # the first bound >= amount: le
        total += amount
    if not any(counts):
        return
    histogram._sum.inc(total)
    for bucket, count in zip(histogram._buckets, counts, strict=True):
        if count:
            bucket.inc(count)

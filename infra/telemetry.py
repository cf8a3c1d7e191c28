"""Latency buckets shared by every per-hop histogram, so one dashboard (or
`benchmarks.freshness`) can read the hops side by side."""

from __future__ import annotations

# Seconds: fine below 50 ms, where command -> visible should live.
HOP_BUCKETS = (.001, .002, .003, .005, .0075, .01, .015, .02, .03, .05, .075, .1, .15, .25,
               .5, 1, 2.5, 5, 10, 30)

"""The cyclic garbage collector's settings for RingiFlow's long-running processes.

A full (generation 2) collection walks every tracked object. With CPython's default
thresholds (700, 10, 10) the command API, which keeps up to
`RINGIFLOW_COMMAND_STATE_CACHE` aggregate states (ADR 0013), ran one about once a
second under load, each 60–90 ms long, stalling every request in flight: that was
its p99 (issue 19). So, once a process has built its application:
- everything alive then (modules, routes, models, settings) is moved out of the
  collector's reach for good (`gc.freeze`), and
- the youngest generation is collected after 10,000 net allocations instead of 700,
  the next after 50 of those, the oldest after 100 of those (and, as always, only
  once the long-lived objects grew by a quarter).
Reference counting still frees acyclic garbage at once; only garbage in cycles waits
longer, and the youngest collection still comes every 10,000 allocations."""

from __future__ import annotations

import gc

THRESHOLDS = (10_000, 50, 100)


def settle() -> None:
    """Call once the process's long-lived objects exist, before it starts serving."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)

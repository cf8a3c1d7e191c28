"""A per-recipient rate limit: a token bucket per recipient, so a burst of workflow
activity cannot flood one person's inbox. A notification over the limit is not sent and
is recorded as skipped ("rate limited"), as throttling notification services do.
Waiting for the token instead would slow the whole group to one person's rate: a batch
is acknowledged whole, so every other recipient's notifications would wait too (and a
steady flood would build a backlog that never drains). `max_wait_s` allows a short
wait where that is acceptable."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Bucket:
    tokens: float
    at: float


@dataclass
class RateLimit:
    per_minute: float
    burst: float
    max_wait_s: float = 0.0
    buckets: dict[str, Bucket] = field(default_factory=dict)

    def wait_s(self, recipient: str, now: float | None = None) -> float | None:
        """Take a token for `recipient`: 0 if one is there, else how long until it is
        (the caller waits that long, then sends); None when that would be longer than
        `max_wait_s` (no token is taken: the notification is not to be sent)."""
        now = time.monotonic() if now is None else now
        bucket = self.buckets.get(recipient)
        if bucket is None:
            bucket = self.buckets[recipient] = Bucket(self.burst, now)
        rate = self.per_minute / 60.0
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        wait = 0.0 if bucket.tokens >= 1 else (1 - bucket.tokens) / rate
        if wait > self.max_wait_s:
            return None
        bucket.tokens -= 1
        return wait

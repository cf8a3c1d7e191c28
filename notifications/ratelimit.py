"""A per-recipient rate limit: a token bucket per recipient, so a burst of workflow
activity cannot flood one person's inbox. A notification over the limit waits for its
token (delivered late, never dropped)."""

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
    buckets: dict[str, Bucket] = field(default_factory=dict)

    def wait_s(self, recipient: str, now: float | None = None) -> float:
        """Take a token for `recipient`: 0 if one is there, else how long until it is
        (the token is taken now; the caller waits that long before sending)."""
        now = time.monotonic() if now is None else now
        bucket = self.buckets.get(recipient)
        if bucket is None:
            bucket = self.buckets[recipient] = Bucket(self.burst, now)
        rate = self.per_minute / 60.0
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        bucket.tokens -= 1
        return 0.0 if bucket.tokens >= 0 else -bucket.tokens / rate

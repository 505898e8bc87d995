"""Token buckets: a per-key rate limit with bursts (pure; the clock is passed in)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TokenBucket", "TokenBuckets"]


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    rate: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens; returns 0 on success, else seconds until they exist."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate


class TokenBuckets:
    """One bucket per key (client id), forgotten when idle and full again.

    Args:
        rate: tokens per second per key.
        burst: bucket size per key.
        max_keys: buckets kept at most (the idle ones are dropped first).
    """

    def __init__(self, rate: float, burst: float, *, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key: str, now: float, cost: float = 1.0) -> float:
        """Take from ``key``'s bucket; 0 when allowed, else the seconds to wait."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._evict(now)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self.burst, now)
        return bucket.take(now, cost)

    def _evict(self, now: float) -> None:
        full = [
            key
            for key, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.updated) * bucket.rate >= bucket.burst
        ]
        for key in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[key]

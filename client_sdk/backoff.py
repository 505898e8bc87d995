"""Reconnect policies: exponential backoff with full jitter, and a circuit breaker.

Both are pure: the random source and the clock are passed in, so tests are exact and
the connection shell only asks "how long do I wait?" and "may I try now?".

Backoff (AWS "full jitter"): the n-th consecutive failure waits ``uniform(0, min(cap,
base * multiplier**n))``; a success resets n. Spreading retries over the whole window is
what keeps a fleet of clients from reconnecting in lockstep after a server restart.

Circuit breaker around connecting: ``closed`` lets every attempt through; after
``failure_threshold`` consecutive failures it is ``open`` and refuses attempts for
``reset_timeout`` seconds; then ``half_open`` lets one probe through, whose outcome
closes or re-opens it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from enum import StrEnum

__all__ = ["Backoff", "BreakerState", "CircuitBreaker"]


class Backoff:
    """Capped exponential backoff with full jitter.

    Args:
        base: the window of the first retry, in seconds.
        cap: the largest window.
        multiplier: growth of the window per consecutive failure.
        rng: returns a float in [0, 1); injected for deterministic tests.
    """

    def __init__(
        self,
        base: float = 0.1,
        cap: float = 10.0,
        multiplier: float = 2.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if base <= 0 or cap < base or multiplier < 1:
            raise ValueError("need 0 < base <= cap and multiplier >= 1")
        self.base = base
        self.cap = cap
        self.multiplier = multiplier
        self._rng = rng
        self.failures = 0

    def window(self) -> float:
        """The current upper bound of the delay, in seconds."""
        # min() before the power would overflow for long outages; cap the exponent.
        exponent = min(self.failures, 64)
        return float(min(self.cap, self.base * self.multiplier**exponent))

    def next_delay(self) -> float:
        """Record one more failure and return how long to wait before the next try."""
        delay = self._rng() * self.window()
        self.failures += 1
        return delay

    def reset(self) -> None:
        """Forget past failures (call after a success)."""
        self.failures = 0


class BreakerState(StrEnum):
    """States of the connect circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """A small circuit breaker; the caller passes ``now`` on every call.

    Args:
        failure_threshold: consecutive failures that open the breaker.
        reset_timeout: seconds an open breaker refuses attempts before one probe.
    """

    def __init__(self, failure_threshold: int = 5, reset_timeout: float = 15.0) -> None:
        if failure_threshold < 1 or reset_timeout < 0:
            raise ValueError("need failure_threshold >= 1 and reset_timeout >= 0")
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.failures = 0
        self.opened_at: float | None = None
        self._probing = False

    def state(self, now: float) -> BreakerState:
        """The state at time ``now``."""
        if self.opened_at is None:
            return BreakerState.CLOSED
        if now - self.opened_at >= self.reset_timeout:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allow(self, now: float) -> bool:
        """Whether an attempt may start now (a half-open breaker allows one probe)."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def retry_in(self, now: float) -> float:
        """Seconds until an attempt would be allowed (0 when allowed now)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.reset_timeout - now)

    def record_success(self) -> None:
        """An attempt succeeded: close the breaker."""
        self.failures = 0
        self.opened_at = None
        self._probing = False

    def record_failure(self, now: float) -> None:
        """An attempt failed: count it, and open (or re-open) the breaker at the threshold."""
        self.failures += 1
        if self._probing or self.failures >= self.failure_threshold:
            self.opened_at = now
        self._probing = False

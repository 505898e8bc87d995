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

Close policy (``classify_close``): which server closes are worth retrying and which
must stop syncing (a bad token must surface, not spin).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from protocol import (
    Error,
    ErrorCode,
    Forbidden,
    ProtocolVersionError,
    RateLimited,
    TetherError,
    Unauthorized,
    error_from_code,
)

__all__ = ["Backoff", "CircuitBreaker", "CircuitState", "Disposition", "classify_close"]


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


class CircuitState(StrEnum):
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

    def state(self, now: float) -> CircuitState:
        """The state at time ``now``."""
        if self.opened_at is None:
            return CircuitState.CLOSED
        if now - self.opened_at >= self.reset_timeout:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    def allow(self, now: float) -> bool:
        """Whether an attempt may start now (a half-open breaker allows one probe)."""
        state = self.state(now)
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and not self._probing:
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


@dataclass(frozen=True, slots=True)
class Disposition:
    """What to do after the server closed: retry (after at least ``min_delay`` s) or stop."""

    retry: bool
    error: TetherError | None = None
    min_delay: float = 0.0


def classify_close(code: int | None, reason: str, server_error: Error | None) -> Disposition:
    """Default retryable-or-fatal policy for a close code (protocol ERROR_TABLE).

    4401 (bad token), 4403 (forbidden) and a protocol-version 4409 stop syncing:
    retrying cannot help and must not spin. 4429 backs off for at least a second. A
    conflict 4409, 4400/4413 (our frame was refused), 1011/1012/1013, a normal close or
    an abrupt loss are retried with backoff.

    Args:
        code: the close code (None when the link dropped without a close frame).
        reason: the close reason.
        server_error: the ``Error`` message that preceded the close, if any.

    Returns:
        The disposition.
    """
    text = server_error.message if server_error is not None else reason
    if code == 4401 or (server_error is not None and server_error.code == ErrorCode.UNAUTHORIZED):
        return Disposition(False, Unauthorized(text or "token refused"))
    if code == 4403:
        return Disposition(False, Forbidden(text or "forbidden"))
    if code == 4409 and (server_error is None or server_error.code != ErrorCode.CONFLICT):
        return Disposition(False, ProtocolVersionError(text or "protocol version refused"))
    if code == 4429:
        return Disposition(True, RateLimited(text or "rate limited"), min_delay=1.0)
    if server_error is not None:
        return Disposition(True, error_from_code(server_error.code, server_error.message))
    return Disposition(True, None)

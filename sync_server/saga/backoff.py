"""Backoff policies: how long to wait before attempt n+1. Pure functions of an RNG.

Exponential backoff with *full jitter* (a uniform draw in ``[0, capped delay]``), the
variant that spreads retries of many clients best. LESSONS: DBOS and Temporal retry
without jitter; Tether adds it everywhere. The RNG is injected so tests are
deterministic and the saga machine stays free of randomness.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Protocol

from sync_server.saga.definitions import RetryPolicy

__all__ = ["DelayPolicy", "Uniform", "exponential_delay", "jittered", "no_delay"]


class Uniform(Protocol):
    """The part of ``random.Random`` a backoff needs."""

    def uniform(self, a: float, b: float) -> float: ...


DelayPolicy = Callable[[RetryPolicy, int], float]
"""``delay(policy, failed_attempt) -> seconds`` before the next attempt."""


def exponential_delay(policy: RetryPolicy, failed_attempt: int, rng: Uniform | None) -> float:
    """Seconds to wait after the ``failed_attempt``-th attempt (1-based) failed.

    Args:
        policy: base delay, multiplier, cap and whether to jitter.
        failed_attempt: the attempt that just failed (1 for the first).
        rng: the source of jitter; ``None`` means no jitter.

    Returns:
        ``min(max_delay, base * multiplier**(n-1))``, drawn uniformly from ``[0, that]``
        when the policy jitters.
    """
    exponent = max(0, failed_attempt - 1)
    # Cap the exponent so a huge attempt count cannot overflow the float.
    capped = min(policy.max_delay, policy.base_delay * policy.multiplier ** min(exponent, 64))
    if policy.jitter and rng is not None:
        return rng.uniform(0.0, capped)
    return capped


def jittered(rng: Uniform | None = None) -> DelayPolicy:
    """A ``DelayPolicy`` drawing jitter from ``rng`` (a fresh ``random.Random`` if None)."""
    source: Uniform = rng if rng is not None else random.Random()

    def delay(policy: RetryPolicy, failed_attempt: int) -> float:
        return exponential_delay(policy, failed_attempt, source)

    return delay


def no_delay(policy: RetryPolicy, failed_attempt: int) -> float:
    """A ``DelayPolicy`` that retries at once (tests, and intake which never retries)."""
    return 0.0

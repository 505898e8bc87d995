"""Backoff with full jitter and the connect circuit breaker (pure, injected RNG/clock)."""

from __future__ import annotations

import pytest

from client_sdk.backoff import Backoff, CircuitBreaker, CircuitState

pytestmark = pytest.mark.timeout(30)


def test_full_jitter_grows_caps_and_resets() -> None:
    b = Backoff(base=0.1, cap=1.0, multiplier=2, rng=lambda: 1.0)
    assert [round(b.next_delay(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    b.reset()
    assert b.next_delay() == pytest.approx(0.1)
    zero = Backoff(rng=lambda: 0.0)
    assert zero.next_delay() == 0.0
    for _ in range(10_000):  # no overflow after a very long outage
        zero.next_delay()
    assert zero.window() == zero.cap


def test_backoff_validates() -> None:
    with pytest.raises(ValueError):
        Backoff(base=0)


def test_breaker_opens_probes_and_closes() -> None:
    br = CircuitBreaker(failure_threshold=2, reset_timeout=10)
    assert br.allow(0) and br.state(0) is CircuitState.CLOSED
    br.record_failure(0)
    assert br.allow(1)
    br.record_failure(1)
    assert br.state(2) is CircuitState.OPEN and not br.allow(2)
    assert br.retry_in(2) == 9
    assert br.allow(11)  # half-open: one probe
    assert not br.allow(11)
    br.record_failure(11)  # failed probe re-opens
    assert br.state(12) is CircuitState.OPEN
    assert br.allow(21)
    br.record_success()
    assert br.state(22) is CircuitState.CLOSED and br.retry_in(22) == 0


def test_breaker_validates() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)

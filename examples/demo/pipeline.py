"""The demo's workflows: the example image pipeline, tuned to show its faults in seconds.

Two variants of ``examples.image_pipeline`` against the flaky job service at
``TETHER_JOB_SERVICE``:

* ``generate_image`` — on a render that fails for good, compensate (refund the credits);
* ``generate_image_hq`` — the same, but *park* instead, so the workflow waits in the
  dead-letter queue for a human (the demo plays that human and requeues it).

A render attempt times out after ``RENDER_TIMEOUT`` seconds (a stalled job), is tried
``RENDER_ATTEMPTS`` times with short, jittered backoff, and is guarded by the
``render-service`` circuit breaker, whose demo policy (``BREAKERS``) opens after a few
consecutive failures and probes again quickly.
"""

from __future__ import annotations

import os

from examples.image_pipeline import build_pipeline
from sync_server.saga import RetryPolicy, Workflow
from sync_server.saga.breaker import BreakerPolicy

__all__ = [
    "BREAKERS",
    "DOOMED_FAILURES",
    "RENDER_ATTEMPTS",
    "RENDER_TIMEOUT",
    "build_workflows",
    "workflows",
]

RENDER_TIMEOUT = 2.0
"""Seconds a render attempt may take; a stalled job times out and is retried."""
RENDER_ATTEMPTS = 4
"""Attempts of a render before it is dead-lettered."""
DOOMED_FAILURES = RENDER_ATTEMPTS + 2
"""``fail_first`` that exhausts every attempt of a first run (a requeue then succeeds).

The job service counts the requests it saw, the saga counts attempts: an attempt cut
off by the demo's server SIGKILL (or a lease taken over) runs again under the same
attempt number, so the job service sees one request more than the saga counted.
Two spare failures keep the dead letter certain across such interruptions; a requeue
still succeeds within its ``RENDER_ATTEMPTS``."""
BREAKERS = {
    "render-service": BreakerPolicy(
        failure_threshold=4, reset_timeout=1.5, probe_timeout=5.0, recheck=0.25
    )
}
"""The demo's breaker numbers (the defaults wait 30 s before probing)."""


def build_workflows(url: str) -> list[Workflow]:
    """The demo's two workflow definitions against the job service at ``url``."""
    retry = RetryPolicy(max_attempts=RENDER_ATTEMPTS, base_delay=0.2, max_delay=1.5, multiplier=2)
    return [
        build_pipeline(url, render_timeout=RENDER_TIMEOUT, render_retry=retry),
        build_pipeline(
            url,
            name="generate_image_hq",
            render_timeout=RENDER_TIMEOUT,
            render_retry=retry,
            on_failure="park",
        ),
    ]


workflows = build_workflows(os.environ.get("TETHER_JOB_SERVICE", "http://127.0.0.1:8701"))
"""For ``sync-server serve --workflows examples.demo.pipeline:workflows``."""

"""Prometheus metrics of one server instance (its own registry, so several apps can
live in one process, as they do in tests).

Every series an operator needs to see whether the promises hold in production:

* workflows — ``tether_workflows_started_total{workflow}`` (submits applied on this
  instance) and ``tether_workflows_finished_total{workflow,status}`` (completed,
  compensated, failed, cancelled, or parked, on the instance that ran the last step);
* steps — ``tether_step_attempts_total{workflow,step,kind}`` and
  ``tether_step_retries_total{workflow,step}`` (attempts after the first);
* the log — ``tether_event_append_seconds{source}`` (one push batch or one saga
  checkpoint transaction) and ``tether_event_delivery_seconds`` (an event's commit
  time to its hand-off to a connection), ``tether_events_delivered_total``;
* backlogs — ``tether_outbox_pending``, ``tether_outbox_lag_seconds``,
  ``tether_saga_lag_seconds`` (the oldest due workflow nobody runs),
  ``tether_hub_lag_seconds`` (the oldest event not yet fanned out), ``tether_dlq_depth``;
* ``tether_breaker_state{breaker}`` (0 closed, 1 half-open, 2 open) and
  ``tether_breaker_opened_total{breaker}``;
* ``tether_connected_clients``, ``tether_mutations_total{status}``, push latency,
  rate limiting and slow consumers;
* SLOs (``sync_server.slo``) — ``tether_slo_value{slo,tenant,workflow}``,
  ``tether_slo_budget_left{slo,tenant,workflow}`` and ``tether_slo_objective{slo}``;
* ``tether_alerts_total{kind}`` (``sync_server.monitor.AlertLog`` counts them);
  ``tether_reconciliation_repairs_total{kind}`` is registered by the reconciliation
  wiring in ``sync_server.app`` on this same registry.

``MeteredApplier`` and ``MeteredHub`` are the push applier and the hub with these hooks
called at the right moments, so neither core module knows about Prometheus.

Counters are per instance (Prometheus sums them); the backlog gauges read the shared
store, so every instance reports the same value.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from protocol import Event, Mutation, MutationResult
from sync_server.auth import Principal
from sync_server.domain import MutationApplier
from sync_server.hub import Hub
from sync_server.store.base import Store

__all__ = ["BREAKER_STATE_VALUES", "MeteredApplier", "MeteredHub", "Metrics"]

BREAKER_STATE_VALUES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
"""The value ``tether_breaker_state`` takes for each breaker state."""

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_DELIVERY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)


class Metrics:
    """Every metric the server exports on ``/metrics``, and the hooks that feed them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connected_clients = Gauge(
            "tether_connected_clients", "WebSocket clients connected", registry=r
        )
        self.mutations = Counter(
            "tether_mutations_total", "Pushed mutations by outcome", ["status"], registry=r
        )
        self.slow_consumers = Counter(
            "tether_slow_consumers_total",
            "Connections cut off for a full send queue",
            registry=r,
        )
        self.rate_limited = Counter(
            "tether_rate_limited_total", "Pushes refused by the rate limit", registry=r
        )
        self.events_delivered = Counter(
            "tether_events_delivered_total", "Events handed to client connections", registry=r
        )
        self.push_seconds = Histogram(
            "tether_push_seconds",
            "Time to apply one pushed batch",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.workflows_started = Counter(
            "tether_workflows_started_total",
            "Workflows accepted (submit applied) on this instance",
            ["workflow"],
            registry=r,
        )
        self.workflows_finished = Counter(
            "tether_workflows_finished_total",
            "Workflows that ended (completed, compensated, failed, cancelled) or parked",
            ["workflow", "status"],
            registry=r,
        )
        self.step_attempts = Counter(
            "tether_step_attempts_total",
            "Step attempts started (kind: step or compensation)",
            ["workflow", "step", "kind"],
            registry=r,
        )
        self.step_retries = Counter(
            "tether_step_retries_total",
            "Step attempts after the first (retries)",
            ["workflow", "step"],
            registry=r,
        )
        self.event_append_seconds = Histogram(
            "tether_event_append_seconds",
            "Time of one transaction that appends events (source: push or saga)",
            ["source"],
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.event_delivery_seconds = Histogram(
            "tether_event_delivery_seconds",
            "Seconds from an event's commit to its hand-off to a client connection",
            registry=r,
            buckets=_DELIVERY_BUCKETS,
        )
        self.outbox_pending = Gauge(
            "tether_outbox_pending", "Outbox items not yet delivered", registry=r
        )
        self.outbox_lag = Gauge(
            "tether_outbox_lag_seconds", "Age of the oldest undelivered outbox item", registry=r
        )
        self.saga_lag = Gauge(
            "tether_saga_lag_seconds",
            "How long the most overdue workflow has waited for an instance to run it",
            registry=r,
        )
        self.hub_lag = Gauge(
            "tether_hub_lag_seconds",
            "Age of the oldest committed event this instance has not yet fanned out",
            registry=r,
        )
        self.dlq_depth = Gauge("tether_dlq_depth", "Open dead letters", registry=r)
        self.breaker_state = Gauge(
            "tether_breaker_state",
            "Circuit breaker state (0 closed, 1 half-open, 2 open)",
            ["breaker"],
            registry=r,
        )
        self.breaker_opened = Counter(
            "tether_breaker_opened_total",
            "Times a circuit breaker opened (seen by this instance)",
            ["breaker"],
            registry=r,
        )
        self.alerts = Counter("tether_alerts_total", "Alerts raised, by kind", ["kind"], registry=r)
        # SLOs (sync_server.slo), refreshed by the monitor over its window.
        slo_labels = ["slo", "tenant", "workflow"]
        self.slo_value = Gauge(
            "tether_slo_value", "Current value of an SLO over its window", slo_labels, registry=r
        )
        self.slo_objective = Gauge("tether_slo_objective", "An SLO's target", ["slo"], registry=r)
        self.slo_budget_left = Gauge(
            "tether_slo_budget_left",
            "Share of an SLO's error budget left over its window (negative: overspent)",
            slo_labels,
            registry=r,
        )
        self.workflow_versions = Gauge(
            "tether_workflows_in_flight",
            "Workflows running, compensating or parked, by name, definition version and status"
            " (what a rolling deploy still has to finish)",
            ["workflow", "version", "status"],
            registry=r,
        )

    def set_version_counts(self, counts: Sequence[tuple[str, str, str, int]]) -> None:
        """Replace ``tether_workflows_in_flight`` with a fresh reading (a version whose
        workflows all ended disappears)."""
        self.workflow_versions.clear()
        for name, version, status, count in counts:
            self.workflow_versions.labels(name, version, status).set(count)

    # ------------------------------------------------------------------ hooks
    def observe_push(
        self, mutations: Sequence[Any], results: Sequence[Any], seconds: float
    ) -> None:
        """One pushed batch was applied (its transaction appended the events).

        Args:
            mutations: the batch's ``Mutation`` s.
            results: their ``MutationResult`` s, in the same order.
            seconds: the time the batch took.
        """
        self.push_seconds.observe(seconds)
        self.event_append_seconds.labels("push").observe(seconds)
        names = {m.id: m for m in mutations}
        for result in results:
            status = str(result.status)
            self.mutations.labels(status).inc()
            mutation = names.get(result.id)
            if (
                status == "applied"
                and mutation is not None
                and mutation.name == "submit_workflow"
                and isinstance(mutation.args, dict)
            ):
                self.workflows_started.labels(str(mutation.args.get("name", ""))).inc()

    def observe_append(self, source: str, seconds: float) -> None:
        """A transaction that appends events (``source``: ``saga``…) took ``seconds``."""
        self.event_append_seconds.labels(source).observe(seconds)

    def observe_delivery(
        self, committed_at: Iterable[float], now: float | None = None, connections: int = 1
    ) -> None:
        """Events committed at ``committed_at`` were handed to ``connections`` connections
        now (latency observed once per event, deliveries counted per connection)."""
        now = time.time() if now is None else now
        count = 0
        for at in committed_at:
            self.event_delivery_seconds.observe(max(0.0, now - at))
            count += 1
        self.events_delivered.inc(count * connections)

    def step_attempt(self, workflow: str, step: str, attempt: int, compensation: bool) -> None:
        """An attempt of a step (or of its compensation) starts."""
        kind = "compensation" if compensation else "step"
        self.step_attempts.labels(workflow, step, kind).inc()
        if attempt > 1 and not compensation:
            self.step_retries.labels(workflow, step).inc()

    def workflow_finished(self, workflow: str, status: str) -> None:
        """A workflow reached a terminal status or parked."""
        self.workflows_finished.labels(workflow, status).inc()

    def breaker_changed(self, name: str, state: str) -> None:
        """A circuit breaker moved to ``state`` (``closed``, ``half_open``, ``open``)."""
        self.breaker_state.labels(name).set(BREAKER_STATE_VALUES.get(state, 0.0))
        if state == "open":
            self.breaker_opened.labels(name).inc()

    # ------------------------------------------------------------------ output
    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The current value of one sample (0 if absent), e.g. for the dashboard."""
        found = self.registry.get_sample_value(name, labels or {})
        return 0.0 if found is None else float(found)

    def total(self, name: str) -> float:
        """The sum of a metric's samples over all label values (``name`` is the sample)."""
        total = 0.0
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name == name:
                    total += sample.value
        return total

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


class MeteredApplier(MutationApplier):
    """The push applier, timing every batch and counting its outcomes.

    Args:
        store: the event store.
        workflows: definitions by name.
        metrics: where to report.
        **options: the other ``MutationApplier`` arguments (``on_report``, ``clock``).
    """

    def __init__(self, store: Store, workflows: Any, *, metrics: Metrics, **options: Any) -> None:
        super().__init__(store, workflows, **options)
        self.metrics = metrics

    async def push(
        self, principal: Principal, client_id: str, mutations: list[Mutation]
    ) -> list[MutationResult]:
        """``MutationApplier.push``, observed (``tether_push_seconds`` and friends)."""
        started = time.perf_counter()
        results = await super().push(principal, client_id, mutations)
        self.metrics.observe_push(mutations, results, time.perf_counter() - started)
        return results


class MeteredHub(Hub):
    """The hub, observing each event's delivery latency as it reaches a connection.

    Args:
        store: the event store.
        metrics: where to report.
        **options: the other ``Hub`` arguments.
    """

    def __init__(self, store: Store, *, metrics: Metrics, **options: Any) -> None:
        super().__init__(store, **options)
        self.metrics = metrics

    def on_batch(self, events: list[Event], subscribers: int) -> None:
        """Time a tenant batch once as it is handed to its connections (not once per
        connection: with a thousand clients that cost more than the delivery)."""
        self.metrics.observe_delivery([event.at for event in events], connections=subscribers)

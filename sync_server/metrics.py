"""Prometheus metrics of one server instance (its own registry, so several apps can
live in one process, as they do in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]


class Metrics:
    """Every metric the server exports on ``/metrics``."""

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
            "tether_events_delivered_total", "Events sent to clients", registry=r
        )
        self.push_seconds = Histogram(
            "tether_push_seconds",
            "Time to apply one pushed batch",
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)

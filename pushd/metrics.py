"""What an operator watches: Prometheus metrics, one registry per pushd service
(so several services in one process, as in the tests, never collide)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.connections = Gauge(
            "pushd_connections", "Open subscriber connections", ["transport"], registry=r
        )
        self.subscriptions = Gauge("pushd_subscriptions", "Local subscriptions", registry=r)
        self.published = Counter(
            "pushd_messages_published", "Messages accepted, by API", ["api"], registry=r
        )
        self.deliveries = Counter(
            "pushd_deliveries", "Messages handed to local subscribers", registry=r
        )
        self.bus_foreign = Counter(
            "pushd_bus_foreign_messages",
            "Bus payloads another process PUBLISHed, delivered as data with no id",
            registry=r,
        )
        self.bus_errors = Counter(
            "pushd_bus_errors",
            "Bus messages that raised on their way in (logged with their channel), by stage",
            ["stage"],
            registry=r,
        )
        self.delivery_errors = Counter(
            "pushd_delivery_errors",
            "Deliveries a local subscriber raised on (logged with the channel)",
            registry=r,
        )
        self.slow_consumers = Counter(
            "pushd_slow_consumers_dropped",
            "Clients dropped because they did not read",
            ["transport"],
            registry=r,
        )
        self.refused = Counter(
            "pushd_auth_refused",
            "Subscriber connections refused, by reason",
            ["reason"],
            registry=r,
        )
        self.broker_up = Gauge("pushd_broker_up", "1 while the broker answers", registry=r)
        self.publish_seconds = Histogram(
            "pushd_publish_seconds",
            "Time from a publish request to the broker's answer",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
            registry=r,
        )

    def watch(self, hub: Any, broker: Any) -> None:
        """Gauges read when scraped, not kept up to date on the hot path."""
        self.subscriptions.set_function(lambda: sum(hub.channels().values()))
        self.broker_up.set_function(lambda: 1 if broker.connected else 0)

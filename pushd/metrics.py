"""What an operator watches: Prometheus metrics, one registry per pushd service
(so several services in one process, as in the tests, never collide)."""

from __future__ import annotations

import os
import platform
import time
from bisect import bisect_left
from functools import partial
from itertools import accumulate
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

import twisted
from pushd import __version__

#: Buckets (s) of Redis commands: a round trip on a LAN is 0.1-1 ms.
REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5)
#: Buckets (s) of a publish, from its request to the broker's answer.
PUBLISH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # Every metric is pushd_<name>, in this service's registry.
        gauge = partial(Gauge, namespace="pushd", registry=r)
        counter = partial(Counter, namespace="pushd", registry=r)
        self.connections = gauge("connections", "Open subscriber connections", ["transport"])
        self.subscriptions = gauge("subscriptions", "Local subscriptions")
        # Counted per publish and per fan-out: without prometheus_client's locks.
        self.published = ReactorCounter(
            "pushd_messages_published", "Messages accepted, by API", "api"
        )
        self.deliveries = ReactorCounter("pushd_deliveries", "Messages handed to local subscribers")
        r.register(self.published)
        r.register(self.deliveries)
        self.reads_sent = counter(
            "subscription_reads",
            "Reads of the broker made for subscriptions (history after since, or the newest id)",
        )
        self.reads_shared = counter(
            "subscription_reads_shared",
            "Subscriptions answered by a read another subscription of the same turn asked",
        )
        self.reads_failed = counter(
            "subscription_reads_failed",
            "Subscription reads that failed: their subscriptions went on live, recovered false",
        )
        self.bus_foreign = counter(
            "bus_foreign_messages",
            "Bus payloads another process PUBLISHed, delivered as data with no id",
        )
        self.bus_errors = counter(
            "bus_errors",
            "Bus messages that raised on their way in (logged with their channel), by stage",
            ["stage"],
        )
        self.delivery_errors = counter(
            "delivery_errors", "Deliveries a local subscriber raised on (logged with the channel)"
        )
        self.slow_consumers = counter(
            "slow_consumers_dropped", "Clients dropped because they did not read", ["transport"]
        )
        self.refused = counter(
            "auth_refused", "Subscriber connections refused, by reason", ["reason"]
        )
        self.broker_up = gauge("broker_up", "1 while the broker answers (every Redis shard)")
        self.redis_up = gauge(
            "redis_up", "1 while this node is connected to the Redis shard", ["shard", "redis"]
        )
        self.publish_seconds = ReactorHistogram(
            "pushd_publish_seconds",
            "Time from a publish request to the broker's answer",
            PUBLISH_BUCKETS,
        )
        r.register(self.publish_seconds)
        self.redis_seconds = CommandSeconds()
        r.register(self.redis_seconds)
        gauge(
            "build_info",
            "Always 1: the versions of pushd, Python and Twisted in its labels",
            ["version", "python", "twisted"],
        ).labels(__version__, platform.python_version(), twisted.__version__).set(1)
        # process_* (memory, CPU seconds, file descriptors, start time; read from
        # /proc when scraped) and python_info, in this registry, not the global one.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    def watch(self, hub: Any, broker: Any) -> None:
        """Gauges read when scraped, not kept up to date on the hot path."""
        self.subscriptions.set_function(lambda: sum(hub.channels().values()))
        self.broker_up.set_function(lambda: 1 if broker.connected else 0)
        for index, shard in enumerate(broker.shards()):
            self.redis_up.labels(shard=str(index), redis=shard.name).set_function(
                partial(_shard_up, broker, index)
            )
        broker.time_commands(self.redis_seconds)

    def watch_presence(self, presence: Any) -> None:
        """The node's presence (pushd.presence), when it has some."""
        gauge = partial(Gauge, namespace="pushd", registry=self.registry)
        members = gauge("presence_members", "Presence members on this node")
        members.set_function(presence.count)
        waiting = gauge(
            "presence_events_waiting",
            "Join and leave events waiting to be sent (coalesced, JOIN_LEAVE_BURST a window)",
        )
        waiting.set_function(presence.events_waiting)


# The metrics every publish counts and observes. prometheus_client's take a
# lock for each change (its Histogram two: 0.5 us an observation); these count
# in plain ints and lists (0.1 us), read when scraped. They are changed and
# scraped on the reactor thread only, so without locks. Each series has its
# `_created` sample as prometheus_client's have, unless its documented
# PROMETHEUS_DISABLE_CREATED_SERIES says not to.
_CREATED = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in (
    "true",
    "1",
    "t",
)


class _Count:
    """One series of a ReactorCounter."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0
        self.created = time.time()

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class ReactorCounter(Collector):
    """A counter `<name>_total`: with a label, one series per value
    (`labels(value).inc()`); without, `inc()`."""

    def __init__(self, name: str, help: str, label: str | None = None) -> None:
        self.name = name
        self.help = help
        self._label = label
        self._series: dict[str, _Count] = {}
        if label is None:
            self.inc = self.labels("").inc

    def labels(self, value: str) -> _Count:
        """The series of the label's `value` (made on first use)."""
        series = self._series.get(value)
        if series is None:
            series = self._series[value] = _Count()
        return series

    def _family(self) -> CounterMetricFamily:
        labels = [] if self._label is None else [self._label]
        return CounterMetricFamily(self.name, self.help, labels=labels)

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> list[Metric]:
        family = self._family()
        for value, series in sorted(self._series.items()):
            labels = [] if self._label is None else [value]
            family.add_metric(labels, series.value, created=series.created if _CREATED else None)
        return [family]


class _Series:
    """One series of a histogram: a count per bucket (the last: over every
    bound) and the sum of the seconds."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds


def _add_series(
    family: HistogramMetricFamily, names: list[str], labels: list[str], series: _Series
) -> None:
    bounds = [*(repr(float(b)) for b in series.bounds), "+Inf"]
    cumulative = list(accumulate(series.counts))
    family.add_metric(labels, list(zip(bounds, cumulative, strict=True)), series.sum)
    if _CREATED:
        created = dict(zip(names, labels, strict=True))
        family.samples.append(Sample(f"{family.name}_created", created, series.created))


class ReactorHistogram(Collector):
    """A histogram without labels (`observe(seconds)`)."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.help = help
        self._series = _Series(buckets)
        self.observe = self._series.observe

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.help)]

    def collect(self) -> list[Metric]:
        family = HistogramMetricFamily(self.name, self.help)
        _add_series(family, [], [], self._series)
        return [family]


class CommandSeconds(Collector):
    """`pushd_redis_command_seconds{shard,command}`, the histogram every publish
    observes (as ReactorHistogram, by shard and command)."""

    name = "pushd_redis_command_seconds"
    help = (
        "Time from sending a command to Redis to its reply (errors included, lost "
        "connections and timeouts not), by shard and command (a script: its .lua name)"
    )

    def __init__(self) -> None:
        self._series: dict[tuple[str, str], _Series] = {}

    def labels(self, *, shard: str, command: str) -> _Series:
        """The series of `command` on `shard` (made on first use), to `observe(seconds)`."""
        series = self._series.get((shard, command))
        if series is None:
            series = self._series[shard, command] = _Series(REDIS_BUCKETS)
        return series

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.help, labels=["shard", "command"])]

    def collect(self) -> list[Metric]:
        family = HistogramMetricFamily(self.name, self.help, labels=["shard", "command"])
        for (shard, command), series in sorted(self._series.items()):
            _add_series(family, ["shard", "command"], [shard, command], series)
        return [family]


def _shard_up(broker: Any, index: int) -> int:
    return 1 if broker.shards()[index].up else 0

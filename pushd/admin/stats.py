"""What the admin console shows: this node's stats snapshot, every second,
and the view of all nodes made of every node's snapshot.

Each node writes its snapshot through the broker (`Broker.node_stats`; on
Redis a hash on the first shard, `<prefix>!stats`, field node id -> the
snapshot with `"until": <ms>`) and reads every live node's back in the same
script; a node whose `until` passed (it stopped writing: it died) is
dropped and deleted, so a dead node leaves the view within --node-ttl
seconds and one tick. The memory broker: this node alone.

The view (`View.body`, JSON)::

    {"time": <ms>, "partial": false,
     "nodes": [<snapshot>...],
     "totals": {"nodes", "connections", "transports": {..}, "subscriptions",
                "published_per_s", "deliveries_per_s", "presence"},
     "top_subscribers": [{"channel", "subscribers"}...],   (summed over nodes)
     "top_rates": [{"channel", "rate"}...]}                (max over nodes)

A channel's rate is its messages per second over the last RATE_WINDOW seconds.

A channel's subscribers add up over nodes; its rate does not: every node with
subscribers of a channel sees each of its messages, so the channel's rate is
the largest a node saw. Both lists are made of each node's top
TOP_CHANNELS, so a channel below every node's top ten is missed.

Cost: a script call a second per node (a hash of a field per node, some
hundreds of bytes each); while the console is on, the hub adds one dict
increment per message it takes in (not per subscriber), and the per-channel
counts are sorted once a second.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from pushd import __version__
from pushd.broker import Broker, BrokerUnavailable
from pushd.config import Config
from pushd.hub import Hub
from pushd.message import dump_json, load_json
from pushd.metrics import Metrics
from pushd.presence import Presence

log = Logger()

#: Channels each busiest list holds.
TOP_CHANNELS = 10
#: Ticks (seconds) a channel's rate is averaged over.
RATE_WINDOW = 10


def _sum_samples(metric: Any, suffix: str = "") -> dict[str, float]:
    """A prometheus_client metric's samples (those named with `suffix`) by
    their first label's value ("" without labels)."""
    values: dict[str, float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if suffix and not sample.name.endswith(suffix):
                continue
            label = next(iter(sample.labels.values()), "")
            values[label] = values.get(label, 0.0) + sample.value
    return values


def describe_address(port: Any) -> str:
    """`host:port` of a listening port (or a unix socket's path)."""
    host = port.getHost()
    if hasattr(host, "port"):
        where = str(host.host)
        if ":" in where:
            where = f"[{where}]"
        return f"{where}:{host.port}"
    name = getattr(host, "name", None)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return f"unix:{name}" if name else str(host)


class NodeStats:
    """This node's snapshot (`snapshot`, once a tick: rates are per second
    since the last one) and the view of all nodes (`exchange`)."""

    def __init__(
        self,
        *,
        config: Config,
        broker: Broker,
        hub: Hub,
        metrics: Metrics,
        presence: Presence | None,
        clock: Any,
    ) -> None:
        self._config = config
        self._broker = broker
        self._hub = hub
        self._metrics = metrics
        self._presence = presence
        self._clock = clock
        self._started = clock.seconds()
        self._last_tick = time.monotonic()
        self._last_totals = (self._published(), self._deliveries())
        #: What tells the addresses this node listens on (set by the service).
        self.addresses: Callable[[], list[str]] = lambda: list(config.listen)
        self._window: deque[tuple[float, dict[str, int]]] = deque()
        self._window_counts: dict[str, int] = {}
        hub.rates = {}

    def _published(self) -> float:
        return sum(_sum_samples(self._metrics.published, "_total").values())

    def _deliveries(self) -> float:
        return sum(_sum_samples(self._metrics.deliveries, "_total").values())

    def snapshot(self) -> dict[str, Any]:
        """This node now (the per-second rates since the previous snapshot)."""
        now = time.monotonic()
        elapsed = max(now - self._last_tick, 1e-3)
        self._last_tick = now
        published, deliveries = self._published(), self._deliveries()
        before, self._last_totals = self._last_totals, (published, deliveries)
        counted, self._hub.rates = self._hub.rates or {}, {}
        rates = self._rates(counted, elapsed)
        channels = self._hub.channels()
        transports = {k: int(v) for k, v in _sum_samples(self._metrics.connections).items() if k}
        busiest = heapq.nlargest(TOP_CHANNELS, channels.items(), key=lambda kv: (kv[1], kv[0]))
        fastest = heapq.nlargest(TOP_CHANNELS, rates.items(), key=lambda kv: (kv[1], kv[0]))
        return {
            "node": self._broker.node,
            "addresses": self.addresses(),
            "version": __version__,
            "broker": "redis" if self._config.uses_redis else "memory",
            "uptime": round(self._clock.seconds() - self._started, 1),
            "connections": sum(transports.values()),
            "transports": transports,
            "subscriptions": sum(channels.values()),
            "channels": len(channels),
            "users": len(self._hub.users()),
            "redis": [
                {"redis": s.name, "up": s.up, "same_list": s.same_list}
                for s in self._broker.shards()
            ],
            "published": int(published),
            "deliveries": int(deliveries),
            "published_per_s": round((published - before[0]) / elapsed, 2),
            "deliveries_per_s": round((deliveries - before[1]) / elapsed, 2),
            "presence": self._presence.count() if self._presence is not None else None,
            "top_subscribers": [{"channel": c, "subscribers": n} for c, n in busiest],
            "top_rates": [{"channel": c, "rate": round(r, 2)} for c, r in fastest],
        }

    def _rates(self, counted: dict[str, int], elapsed: float) -> dict[str, float]:
        """Messages per second per channel over the last RATE_WINDOW ticks
        (one busy second stays in the list a while rather than flicker): a
        running sum, each tick's counts added once and taken off once."""
        totals = self._window_counts
        if len(self._window) == RATE_WINDOW:
            _, gone = self._window.popleft()
            for channel, n in gone.items():
                left = totals[channel] - n
                if left:
                    totals[channel] = left
                else:
                    del totals[channel]
        self._window.append((elapsed, counted))
        for channel, n in counted.items():
            totals[channel] = totals.get(channel, 0) + n
        seconds = sum(e for e, _ in self._window)
        return {channel: n / seconds for channel, n in totals.items()}

    async def exchange(self, ttl: float) -> bytes:
        """Write this node's snapshot, read every live node's: the view, as JSON."""
        mine = self.snapshot()
        partial = False
        try:
            found = await self._broker.node_stats(dump_json(mine), ttl)
            nodes = [n for n in (_parse(raw) for raw in found) if n is not None]
        except BrokerUnavailable:
            nodes, partial = [mine], True
        if not any(n.get("node") == mine["node"] for n in nodes):
            nodes.append(mine)
        return dump_json(aggregate(nodes, partial, int(self._clock.seconds() * 1000)))

    def leave(self) -> Deferred[Any]:
        """This node stops: out of the view at once, not when its entry expires."""
        return self._broker.node_stats(b"", 0)


def _parse(raw: Any) -> dict[str, Any] | None:
    try:
        node = load_json(raw)
    except ValueError:
        return None
    return node if isinstance(node, dict) and isinstance(node.get("node"), str) else None


def _number(value: Any) -> float:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else 0


def aggregate(nodes: list[dict[str, Any]], partial: bool, now_ms: int) -> dict[str, Any]:
    """The view of all nodes (see the module's docstring)."""
    nodes = sorted(nodes, key=lambda n: (str(n.get("addresses")), str(n.get("node"))))
    transports: dict[str, int] = {}
    subscribers: dict[str, int] = {}
    rates: dict[str, float] = {}
    presence = None
    for node in nodes:
        for name, n in (node.get("transports") or {}).items():
            transports[name] = transports.get(name, 0) + int(_number(n))
        for entry in node.get("top_subscribers") or ():
            channel = entry.get("channel")
            if isinstance(channel, str):
                subscribers[channel] = subscribers.get(channel, 0) + int(
                    _number(entry.get("subscribers"))
                )
        for entry in node.get("top_rates") or ():
            channel = entry.get("channel")
            if isinstance(channel, str):
                rates[channel] = max(rates.get(channel, 0), _number(entry.get("rate")))
        if node.get("presence") is not None:
            presence = (presence or 0) + int(_number(node.get("presence")))

    def total(name: str) -> float:
        return sum(_number(node.get(name)) for node in nodes)

    busiest = heapq.nlargest(TOP_CHANNELS, subscribers.items(), key=lambda kv: (kv[1], kv[0]))
    fastest = heapq.nlargest(TOP_CHANNELS, rates.items(), key=lambda kv: (kv[1], kv[0]))
    return {
        "time": now_ms,
        "partial": partial,
        "nodes": nodes,
        "totals": {
            "nodes": len(nodes),
            "connections": int(total("connections")),
            "transports": transports,
            "subscriptions": int(total("subscriptions")),
            "published_per_s": round(total("published_per_s"), 2),
            "deliveries_per_s": round(total("deliveries_per_s"), 2),
            "presence": presence,
        },
        "top_subscribers": [{"channel": c, "subscribers": n} for c, n in busiest],
        "top_rates": [{"channel": c, "rate": round(r, 2)} for c, r in fastest],
    }

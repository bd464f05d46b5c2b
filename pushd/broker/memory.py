"""The in-process broker: what pushd uses when no Redis is configured.

It keeps the Redis broker's promises inside one process: ids of the stream
form, strictly increasing per channel; a bounded, linked history per channel
that expires `history_ttl` seconds after its last message; idempotency keys.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred, succeed

from pushd.broker import IDEMPOTENCY_TTL, Broker, History, Listener, Published, _item_key
from pushd.message import envelope, format_id, parse_id


class _Entry:
    __slots__ = ("data", "id", "key", "prev")

    def __init__(self, key: tuple[int, int], data: bytes, prev: str) -> None:
        self.key = key
        self.id = format_id(*key)
        self.data = data
        self.prev = prev


class _History:
    __slots__ = ("entries", "last", "touched")

    def __init__(self, size: int) -> None:
        self.entries: deque[_Entry] = deque(maxlen=size)
        self.last = (-1, 0)
        self.touched = 0.0


class MemoryBroker(Broker):
    def __init__(self, clock: Any, history_size: int, history_ttl: float) -> None:
        super().__init__()
        self.listener: Listener | None = None
        self._clock = clock
        self._history_size = history_size
        self._history_ttl = history_ttl
        self._histories: dict[str, _History] = {}
        self._subscribed: set[str] = set()
        self._seen: dict[str, tuple[float, str]] = {}

    def _live_history(self, channel: str) -> _History | None:
        history = self._histories.get(channel)
        if history is not None and self._clock.seconds() - history.touched > self._history_ttl:
            del self._histories[channel]
            return None
        return history

    def _expire(self) -> None:
        now = self._clock.seconds()
        horizon = now - self._history_ttl
        for channel in [c for c, h in self._histories.items() if h.touched < horizon]:
            del self._histories[channel]
        for key in [k for k, (until, _) in self._seen.items() if until < now]:
            del self._seen[key]

    def publish(
        self, channel: str, data: bytes, idempotency_key: str | None = None
    ) -> Deferred[Published]:
        return succeed(self._publish(channel, data, idempotency_key))

    def _publish(self, channel: str, data: bytes, idempotency_key: str | None) -> Published:
        now = self._clock.seconds()
        if idempotency_key is not None:
            seen = self._seen.get(idempotency_key)
            if seen is not None and seen[0] >= now:
                return Published(seen[1], repeated=True)
        if len(self._histories) + len(self._seen) > 1024:
            self._expire()
        history = self._live_history(channel)
        if history is None:
            history = self._histories[channel] = _History(self._history_size)
        history.touched = now
        ms = int(now * 1000)
        last_ms, last_seq = history.last
        seq = last_seq + 1 if ms <= last_ms else 0
        history.last = key = (max(ms, last_ms), seq)
        prev = history.entries[-1].id if history.entries else ""
        entry = _Entry(key, data, prev)
        history.entries.append(entry)
        if idempotency_key is not None:
            self._seen[idempotency_key] = (now + IDEMPOTENCY_TTL, entry.id)
        if channel in self._subscribed and self.listener is not None:
            self.listener(channel, envelope(channel, entry.id, data))
        return Published(entry.id)

    def publish_many(
        self, items: list[tuple[str, bytes]], idempotency_key: str | None = None
    ) -> Deferred[list[Published]]:
        return succeed(
            [
                self._publish(channel, data, _item_key(idempotency_key, n))
                for n, (channel, data) in enumerate(items)
            ]
        )

    def push(
        self, channel: str, entry: bytes, event_list: str, data: bytes
    ) -> Deferred[tuple[bool, Published]]:
        return succeed((False, self._publish(channel, data, None)))

    def history(self, channel: str, since: str | None, limit: int | None) -> Deferred[History]:
        h = self._live_history(channel)
        entries = list(h.entries) if h is not None else []
        if since is None:
            picked = entries[-limit:] if limit else entries
            return succeed(History([(e.id, e.data) for e in picked], complete=False))
        after = parse_id(since)
        newer = [e for e in entries if e.key > after]
        # Linked entries: see pushd.broker.
        if newer:
            complete = newer[0].prev == since
        else:
            complete = entries[-1].id == since if entries else False
        if limit is not None:
            newer = newer[:limit]
        return succeed(History([(e.id, e.data) for e in newer], complete))

    def last_id(self, channel: str) -> Deferred[str | None]:
        h = self._live_history(channel)
        return succeed(h.entries[-1].id if h is not None and h.entries else None)

    def subscriber_count(self, channel: str) -> Deferred[int]:
        return succeed(self.local_count(channel) if self.local_count is not None else 0)

    def control(self, command: dict[str, Any]) -> Deferred[int]:
        if command.get("cmd") == "destroy":
            self._histories.pop(command["channel"], None)
        if self.on_control is not None:
            self.on_control(command)
        return succeed(1)

    def subscribe(self, channel: str) -> Deferred[None]:
        self._subscribed.add(channel)
        return succeed(None)

    def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    def when_ready(self) -> Deferred[None]:
        return succeed(None)

    def subscribed_channels(self) -> frozenset[str]:
        return frozenset(self._subscribed)

"""The in-process broker: what pushd uses when no Redis is configured.

It keeps the same promises as the Redis broker inside one process: ids of the
stream form, strictly increasing per channel; a bounded history per channel
that expires `history_ttl` seconds after its last message.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred, succeed

from pushd.broker import Broker, Listener
from pushd.message import envelope, format_id


class _History:
    __slots__ = ("entries", "last", "touched")

    def __init__(self, size: int) -> None:
        self.entries: deque[tuple[tuple[int, int], bytes]] = deque(maxlen=size)
        self.last = (-1, 0)
        self.touched = 0.0


class MemoryBroker(Broker):
    def __init__(self, clock: Any, history_size: int, history_ttl: float) -> None:
        self.listener: Listener | None = None
        self._clock = clock
        self._history_size = history_size
        self._history_ttl = history_ttl
        self._histories: dict[str, _History] = {}
        self._subscribed: set[str] = set()

    def _history(self, channel: str) -> _History:
        now = self._clock.seconds()
        history = self._histories.get(channel)
        if history is None or now - history.touched > self._history_ttl:
            history = self._histories[channel] = _History(self._history_size)
        history.touched = now
        return history

    def _expire(self) -> None:
        horizon = self._clock.seconds() - self._history_ttl
        for channel in [c for c, h in self._histories.items() if h.touched < horizon]:
            del self._histories[channel]

    def publish(self, channel: str, data: bytes) -> Deferred[str]:
        if len(self._histories) > 1024:
            self._expire()
        history = self._history(channel)
        ms = int(self._clock.seconds() * 1000)
        last_ms, last_seq = history.last
        seq = last_seq + 1 if ms <= last_ms else 0
        history.last = key = (max(ms, last_ms), seq)
        msg_id = format_id(*key)
        history.entries.append((key, data))
        if channel in self._subscribed and self.listener is not None:
            self.listener(channel, envelope(channel, msg_id, data))
        return succeed(msg_id)

    def subscribe(self, channel: str) -> Deferred[None]:
        self._subscribed.add(channel)
        return succeed(None)

    def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    def when_ready(self) -> Deferred[None]:
        return succeed(None)

    def subscribed_channels(self) -> frozenset[str]:
        return frozenset(self._subscribed)

"""The local fan-out: which connection of this process listens to which channel.

The hub asks the broker for a channel when its first local subscriber arrives
and lets it go when the last one leaves. Each message reaches the hub once and
is handed, as one Message object (its envelope serialised once, its frame made
once), to every local subscriber. Nothing here knows about sockets.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred

from pushd.broker import Broker
from pushd.message import Message


class Subscriber(Protocol):
    def deliver(self, message: Message) -> None:
        """Take one message of a channel this subscriber is in. Must not block."""


class Hub:
    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._channels: dict[str, set[Subscriber]] = {}
        broker.listener = self.dispatch
        broker.local_counts = self.channels
        broker.local_count = self.count

    def subscribe(self, channel: str, subscriber: Subscriber) -> Deferred[None]:
        """Add `subscriber` to `channel`; fires once the broker feeds the channel.

        No message of the channel can reach the subscriber before that.
        """
        subscribers = self._channels.get(channel)
        if subscribers is None:
            subscribers = self._channels[channel] = set()
        subscribers.add(subscriber)
        return self._broker.subscribe(channel)

    def unsubscribe(self, channel: str, subscriber: Subscriber) -> None:
        subscribers = self._channels.get(channel)
        if subscribers is None:
            return
        subscribers.discard(subscriber)
        if not subscribers:
            del self._channels[channel]
            self._broker.unsubscribe(channel)

    def dispatch(self, channel: str, raw: bytes) -> None:
        """The broker's listener: one message in, one delivery per local subscriber."""
        subscribers = self._channels.get(channel)
        if not subscribers:
            return
        message = Message.from_wire(channel, raw)
        # A delivery may unsubscribe (a slow consumer is dropped): iterate a copy.
        for subscriber in tuple(subscribers):
            subscriber.deliver(message)

    def count(self, channel: str) -> int:
        return len(self._channels.get(channel, ()))

    def channels(self) -> dict[str, int]:
        """Local subscriber count per channel."""
        return {channel: len(subs) for channel, subs in self._channels.items()}

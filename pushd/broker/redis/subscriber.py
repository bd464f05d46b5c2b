"""The subscriber connection: one per process, and its re-subscribe.

txredisapi reconnects a lost subscriber connection but does not re-subscribe
(library findings, 4), so `Subscriber` keeps the set of channels the hub wants
and subscribes them again on every new connection. Each SUBSCRIBE names one
channel: txredisapi matches a multi-channel SUBSCRIBE's confirmations to the
wrong waiters.

The bus is untrusted: any process may PUBLISH on `<prefix><channel>`. The
subscriber connection takes every payload as bytes (no decoding, no number
conversion), `Subscriber.received` lets nothing raise back into txredisapi's
reply parser, and the hub trusts only payloads in pushd's bus format, which
every script here PUBLISHes (pushd.message, BUS_MARKER).
"""

from __future__ import annotations

from typing import Any, Protocol

import txredisapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from pushd.broker.redis.address import RedisAddress
from pushd.broker.redis.keys import Keys
from pushd.broker.redis.pool import KeepTrying, retry_alike
from pushd.broker.redis.reachability import Reachability

log = Logger()


class SubscriberEvents(Protocol):
    """What the subscriber connection tells its shard (pushd.broker.redis.shard.Shard)."""

    def bus_message(self, name: str, payload: bytes) -> None:
        """A payload PUBLISHed on `<prefix><name>`: a channel the hub wants,
        or one of pushd's own (`!control`, `!reply:<node>`). May raise: the
        caller counts it (`bus_error`) and goes on."""

    def bus_error(self, stage: str, name: str) -> None:
        """Called while the exception a payload of `name` raised is handled."""

    def resubscribed(self, channel: str) -> None:
        """`channel` is subscribed again on a new connection: messages may be missing."""

    def subscriber_connected(self) -> None:
        """A new subscriber connection is up (and its channels being subscribed)."""


def log_failure(failure: Failure, what: str) -> None:
    """An errback for a command whose failure nobody waits on."""
    if not isinstance(failure.value, txredisapi.ConnectionError):
        log.failure("Redis {what} failed", failure, what=what)


class _Connection(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    subscriber: Subscriber

    def connectionMade(self) -> Any:
        d = super().connectionMade()
        self.whenConnected().addCallback(self.subscriber.connection_made)
        return d

    def connectionLost(self, reason: Any) -> None:
        self.subscriber.connection_lost(self)
        super().connectionLost(reason)

    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
        self.subscriber.received(channel, message)


class _ConnectionFactory(KeepTrying, txredisapi.SubscriberFactory):  # type: ignore[misc]
    protocol = _Connection

    def __init__(self, subscriber: Subscriber, address: RedisAddress) -> None:
        super().__init__(isLazy=True)
        self.subscriber = subscriber
        self.password = address.password
        self.username = address.username
        # Payloads are bytes, whatever they hold: no decoding (charset), and no
        # number conversion, which would turn a `PUBLISH pushd:c 123` into an
        # int (and "1.50" into 1.5) before pushd sees it.
        self.charset = None
        self.convertNumbers = False
        retry_alike(self)

    def buildProtocol(self, addr: Any) -> _Connection:
        p: _Connection = super().buildProtocol(addr)
        p.subscriber = self.subscriber
        return p


class Subscriber:
    """The channels the hub wants, subscribed on the subscriber connection,
    and pushd's own channels (`own`: commands and replies) besides. `shard`
    names the Redis in the log."""

    def __init__(
        self,
        address: RedisAddress,
        endpoint: IStreamClientEndpoint,
        keys: Keys,
        own: tuple[str, ...],
        events: SubscriberEvents,
        shard: str = "",
    ) -> None:
        self._factory = _ConnectionFactory(self, address)
        self.reachability = Reachability(shard, "subscriber connection")
        self._factory.reachability = self.reachability
        self._endpoint = self.reachability.watch(endpoint)
        self._keys = keys
        self._prefix = keys.prefix.encode()
        self._own = own
        self._events = events
        self.running = False
        self._connection: _Connection | None = None
        self._wanted: set[str] = set()
        self._active: set[str] = set()
        self._sent: dict[str, object] = {}
        self._waiters: dict[str, list[Deferred[None]]] = {}

    @property
    def connected(self) -> bool:
        return self._connection is not None

    def start(self) -> None:
        self.running = True
        self._factory.startConnecting(self._endpoint)

    def stop(self) -> Deferred[Any]:
        self.running = False
        return self._factory.disconnect()  # type: ignore[no-any-return]

    def subscribe(self, channel: str) -> Deferred[None]:
        if channel in self._active:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.setdefault(channel, []).append(d)
        if channel not in self._wanted:
            self._wanted.add(channel)
            if self._connection is not None:
                self._send_subscribe(self._connection, channel)
        return d

    def unsubscribe(self, channel: str) -> None:
        if channel not in self._wanted:
            return
        self._wanted.discard(channel)
        self._active.discard(channel)
        self._sent.pop(channel, None)
        self._release(channel)
        if self._connection is not None:
            d = self._connection.unsubscribe(self._keys.bus(channel))
            d.addErrback(log_failure, "UNSUBSCRIBE")

    def subscribed_channels(self) -> frozenset[str]:
        return frozenset(self._active)

    def _send_subscribe(self, connection: _Connection, channel: str, again: bool = False) -> None:
        token = self._sent[channel] = object()

        def confirmed(_: object) -> None:
            if self._connection is connection and self._sent.get(channel) is token:
                self._active.add(channel)
                self._release(channel)
                if again:
                    self._events.resubscribed(channel)

        connection.subscribe(self._keys.bus(channel)).addCallbacks(
            confirmed, log_failure, errbackArgs=("SUBSCRIBE",)
        )

    def _release(self, channel: str) -> None:
        for d in self._waiters.pop(channel, ()):
            d.callback(None)

    def connection_made(self, connection: _Connection) -> None:
        self.reachability.connected(f"subscribing {len(self._wanted)} channels")
        self._connection = connection
        self._active.clear()
        for own in self._own:
            connection.subscribe(own).addErrback(log_failure, "SUBSCRIBE")
        for channel in self._wanted:
            self._send_subscribe(connection, channel, again=True)
        self._events.subscriber_connected()

    def connection_lost(self, connection: _Connection) -> None:
        if self._connection is connection:
            if self.running:
                self.reachability.unreachable("connection lost")
            self._connection = None
            self._active.clear()
            self._sent.clear()

    def received(self, channel: bytes, payload: bytes) -> None:
        """A payload the subscriber connection received (txredisapi's
        `messageReceived`), for `SubscriberEvents.bus_message`, whatever its
        bytes. This runs inside txredisapi's reply parser: nothing may raise out
        of it, or the connection, and every other message of the same read,
        would be lost."""
        name = ""
        try:
            if not channel.startswith(self._prefix):
                return
            name = channel[len(self._prefix) :].decode("utf-8", "replace")
            if not isinstance(payload, bytes):  # txredisapi converted it after all
                payload = str(payload).encode()
            # A message published before our UNSUBSCRIBE reached Redis may still come.
            if name.startswith("!") or name in self._wanted:
                self._events.bus_message(name, payload)
        except Exception:
            self._events.bus_error("control" if name.startswith("!") else "receive", name)

"""The subscriber connection: one per process, and its re-subscribe.

txredisapi reconnects a lost subscriber connection but does not re-subscribe
(library findings, 4), so the broker keeps the set of channels the hub wants
and subscribes them again on every new connection. Each SUBSCRIBE names one
channel: txredisapi matches a multi-channel SUBSCRIBE's confirmations to the
wrong waiters.

The bus is untrusted: any process may PUBLISH on `<prefix><channel>`. The
subscriber connection takes every payload as bytes (no decoding, no number
conversion), `_bus_received` lets nothing raise back into txredisapi's reply
parser, and the hub trusts only payloads in pushd's bus format, which every
script here PUBLISHes (pushd.message, BUS_MARKER).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from pushd.broker import Broker
from pushd.broker.redis.publisher import _log_failure

log = Logger()


class _Subscriber(txredisapi.SubscriberProtocol):
    broker: Subscriptions

    def connectionMade(self) -> Any:
        d = super().connectionMade()
        self.whenConnected().addCallback(self.broker._connected)
        return d

    def connectionLost(self, reason: Any) -> None:
        self.broker._disconnected(self)
        super().connectionLost(reason)

    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
        self.broker._bus_received(channel, message)


class _SubscriberFactory(txredisapi.SubscriberFactory):
    protocol = _Subscriber

    def __init__(self, broker: Subscriptions) -> None:
        super().__init__(isLazy=True)
        self.broker = broker
        # Payloads are bytes, whatever they hold: no decoding (charset), and no
        # number conversion, which would turn a `PUBLISH pushd:c 123` into an
        # int (and "1.50" into 1.5) before pushd sees it.
        self.charset = None
        self.convertNumbers = False

    def buildProtocol(self, addr: Any) -> _Subscriber:
        p = super().buildProtocol(addr)
        p.broker = self.broker
        return p


class Subscriptions(Broker):
    """The channels the hub wants, subscribed on the subscriber connection."""

    # What it uses of RedisBroker (pushd.broker.redis.broker), which sets it up:
    _prefix: str
    _prefix_bytes: bytes
    _proto: _Subscriber | None
    _wanted: set[str]
    _active: set[str]
    _sent: dict[str, object]
    _waiters: dict[str, list[Deferred[None]]]
    _control_channel: str
    _reply_channel: str
    _check_ready: Callable[..., object]
    _check_epoch: Callable[[], Any]
    _command: Callable[[str, bytes], None]

    def subscribe(self, channel: str) -> Deferred[None]:
        if channel in self._active:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.setdefault(channel, []).append(d)
        if channel not in self._wanted:
            self._wanted.add(channel)
            if self._proto is not None:
                self._send_subscribe(self._proto, channel)
        return d

    def unsubscribe(self, channel: str) -> None:
        if channel not in self._wanted:
            return
        self._wanted.discard(channel)
        self._active.discard(channel)
        self._sent.pop(channel, None)
        self._release(channel)
        if self._proto is not None:
            self._proto.unsubscribe(self._prefix + channel).addErrback(_log_failure, "UNSUBSCRIBE")

    def subscribed_channels(self) -> frozenset[str]:
        return frozenset(self._active)

    def _send_subscribe(self, proto: _Subscriber, channel: str, again: bool = False) -> None:
        token = self._sent[channel] = object()

        def confirmed(_: object) -> None:
            if self._proto is proto and self._sent.get(channel) is token:
                self._active.add(channel)
                self._release(channel)
                if again:
                    self._listener.resume(channel)

        proto.subscribe(self._prefix + channel).addCallbacks(
            confirmed, _log_failure, errbackArgs=("SUBSCRIBE",)
        )

    def _release(self, channel: str) -> None:
        for d in self._waiters.pop(channel, ()):
            d.callback(None)

    def _connected(self, proto: _Subscriber) -> None:
        log.info("Redis subscriber connected; subscribing {n} channels", n=len(self._wanted))
        self._proto = proto
        self._active.clear()
        for own in (self._control_channel, self._reply_channel):
            proto.subscribe(own).addErrback(_log_failure, "SUBSCRIBE")
        for channel in self._wanted:
            self._send_subscribe(proto, channel, again=True)
        self._check_ready()
        Deferred.fromCoroutine(self._check_epoch()).addErrback(_log_failure, "EPOCH")

    def _disconnected(self, proto: _Subscriber) -> None:
        if self._proto is proto:
            if self.running:
                log.warn("Redis subscriber connection lost; reconnecting")
            self._proto = None
            self._active.clear()
            self._sent.clear()

    def _bus_received(self, channel: bytes, payload: bytes) -> None:
        """A payload the subscriber connection received (txredisapi's
        `messageReceived`): a command on pushd's own channels, or a bus payload
        for `BusListener.receive` (`Hub.receive`), whatever its bytes. This runs inside
        txredisapi's reply parser: nothing may raise out of it, or the
        connection, and every other message of the same read, would be lost."""
        name = ""
        try:
            if not channel.startswith(self._prefix_bytes):
                return
            name = channel[len(self._prefix_bytes) :].decode("utf-8", "replace")
            if not isinstance(payload, bytes):  # txredisapi converted it after all
                payload = str(payload).encode()
            if name.startswith("!"):
                self._command(name, payload)
            # A message published before our UNSUBSCRIBE reached Redis may still come.
            elif name in self._wanted:
                self._listener.receive(name, payload)
        except Exception:
            self._listener.bus_error("control" if name.startswith("!") else "receive", name)

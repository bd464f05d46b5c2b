"""The Redis broker: one command pool and one subscriber connection per process.

Publishing runs one Lua script (XADD to the channel's history stream, EXPIRE,
PUBLISH of the envelope with the stream id), so a message is stored and sent
atomically and its id is the stream id. txredisapi loads the script with EVAL
once per connection, then uses EVALSHA, and falls back to EVAL after a NOSCRIPT.

Subscriptions: txredisapi reconnects a lost subscriber connection but does not
re-subscribe (library findings, 4), so the broker keeps the set of channels the
hub wants and subscribes them again on every new connection. Each SUBSCRIBE
names one channel: txredisapi matches a multi-channel SUBSCRIBE's confirmations
to the wrong waiters.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, gatherResults, succeed
from twisted.logger import Logger

from pushd.broker import Broker, BrokerUnavailable, Listener
from pushd.config import RedisAddress
from pushd.message import envelope_prefix

PUBLISH_SCRIPT = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'd', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('PUBLISH', ARGV[1], ARGV[2] .. '"' .. id .. '","data":' .. ARGV[3] .. '}')
return id
"""

log = Logger()


class _Subscriber(txredisapi.SubscriberProtocol):
    broker: RedisBroker

    def connectionMade(self) -> Any:
        d = super().connectionMade()
        self.whenConnected().addCallback(self.broker._connected)
        return d

    def connectionLost(self, reason: Any) -> None:
        self.broker._disconnected(self)
        super().connectionLost(reason)

    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
        self.broker._received(channel, message)


class _SubscriberFactory(txredisapi.SubscriberFactory):
    protocol = _Subscriber

    def __init__(self, broker: RedisBroker) -> None:
        super().__init__(isLazy=True)
        self.broker = broker
        # Payloads go to the clients as they are: keep them bytes.
        self.charset = None

    def buildProtocol(self, addr: Any) -> _Subscriber:
        p = super().buildProtocol(addr)
        p.broker = self.broker
        return p


class RedisBroker(Broker):
    def __init__(
        self,
        reactor: Any,
        address: RedisAddress,
        *,
        prefix: str = "pushd:",
        pool_size: int = 10,
        timeout: float = 5.0,
        history_size: int = 100,
        history_ttl: int = 3600,
    ) -> None:
        self.listener: Listener | None = None
        self._reactor = reactor
        self._address = address
        self._prefix = prefix
        self._prefix_bytes = prefix.encode()
        self._pool_size = pool_size
        self._timeout = timeout
        self._history_args = (str(history_size), str(history_ttl))
        self._pool: Any = None
        self._pool_factory: Any = None
        self._sub_factory: Any = None
        self._proto: _Subscriber | None = None
        self._wanted: set[str] = set()
        self._active: set[str] = set()
        self._sent: dict[str, object] = {}
        self._waiters: dict[str, list[Deferred[None]]] = {}
        self._ready_waiters: list[Deferred[None]] = []

    # -- life cycle

    def _endpoint(self) -> Any:
        return endpoints.clientFromString(self._reactor, self._address.endpoint())

    def startService(self) -> None:
        super().startService()
        a = self._address
        self._pool_factory = txredisapi.RedisFactory(
            None,
            a.db,
            self._pool_size,
            isLazy=True,
            password=a.password,
            username=a.username,
            replyTimeout=self._timeout or None,
        )
        self._pool_factory.startConnecting(self._endpoint())
        self._pool_factory.deferred.addCallback(self._check_ready)
        self._pool = self._pool_factory.handler
        self._sub_factory = _SubscriberFactory(self)
        self._sub_factory.password = a.password
        self._sub_factory.username = a.username
        self._sub_factory.startConnecting(self._endpoint())

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return gatherResults(
            [self._pool_factory.disconnect(), self._sub_factory.disconnect()],
            consumeErrors=True,
        )

    @property
    def connected(self) -> bool:
        return bool(self._pool_factory and self._pool_factory.size) and self._proto is not None

    def when_ready(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._ready_waiters.append(d)
        self._check_ready()
        return d

    def _check_ready(self, _: object = None) -> object:
        if self.connected:
            waiters, self._ready_waiters = self._ready_waiters, []
            for d in waiters:
                d.callback(None)
        return _

    # -- publishing

    def publish(self, channel: str, data: bytes) -> Deferred[str]:
        if not (self._pool_factory and self._pool_factory.size):
            return _unavailable("Redis is not connected")
        d = self._pool.eval(
            PUBLISH_SCRIPT,
            keys=[f"{self._prefix}{{{channel}}}:history"],
            args=[self._prefix + channel, envelope_prefix(channel), data, *self._history_args],
        )
        d.addTimeout(self._timeout or 3600, self._reactor)
        d.addErrback(_as_unavailable)
        return d

    # -- subscriptions

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

    def _send_subscribe(self, proto: _Subscriber, channel: str) -> None:
        token = self._sent[channel] = object()

        def confirmed(_: object) -> None:
            if self._proto is proto and self._sent.get(channel) is token:
                self._active.add(channel)
                self._release(channel)

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
        for channel in self._wanted:
            self._send_subscribe(proto, channel)
        self._check_ready()

    def _disconnected(self, proto: _Subscriber) -> None:
        if self._proto is proto:
            log.warn("Redis subscriber connection lost; reconnecting")
            self._proto = None
            self._active.clear()
            self._sent.clear()

    def _received(self, channel: bytes, message: bytes) -> None:
        if self.listener is not None and channel.startswith(self._prefix_bytes):
            name = channel[len(self._prefix_bytes) :].decode("utf-8", "replace")
            # A message published before our UNSUBSCRIBE reached Redis may still come.
            if name in self._wanted:
                self.listener(name, message)


def _unavailable(why: str) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(BrokerUnavailable(why))
    return d


def _as_unavailable(failure: Any) -> Any:
    failure.trap(txredisapi.RedisError, TimeoutError, CancelledError)
    raise BrokerUnavailable(f"Redis: {failure.getErrorMessage() or failure.type.__name__}")


def _log_failure(failure: Any, what: str) -> None:
    if not failure.check(txredisapi.ConnectionError):
        log.failure("Redis {what} failed", failure, what=what)

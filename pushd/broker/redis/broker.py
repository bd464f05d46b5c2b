"""RedisBroker, the face of the Redis broker (see the package's docstring):
it makes the connections and the parts that use them, routes the bus's
messages (`bus_message`), reads history, and notices that Redis lost its
data (epoch.lua)."""

from __future__ import annotations

import uuid
from contextlib import suppress
from typing import Any

import txredisapi
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pushd.broker import (
    IDEMPOTENCY_TTL,
    Broker,
    BrokerUnavailable,
    History,
    Published,
    meta_ttl,
)
from pushd.broker.redis.address import RedisAddress, SentinelMaster
from pushd.broker.redis.commands import NodeCommands
from pushd.broker.redis.connection import PublishConnection, command
from pushd.broker.redis.counts import NODE_TTL, NodeCounts
from pushd.broker.redis.keys import Keys
from pushd.broker.redis.pool import CommandPool
from pushd.broker.redis.publisher import Publisher
from pushd.broker.redis.scripts import EPOCH, PUBLISH, PUBLISH_MANY, PUSH, READ_AFTER
from pushd.broker.redis.subscriber import Subscriber, log_failure
from pushd.message import dump_json, load_json
from pushd.waiting import Waiters

log = Logger()

__all__ = ["RedisBroker"]

#: Seconds between looks at the connections while `when_ready` waits.
READY_CHECK = 0.05

#: (Sentinel addresses, the master's name): `--redis-sentinel`, `--redis-master`.
SentinelConfig = tuple[tuple[tuple[str, int], ...], str | None]


class RedisBroker(Broker):
    """The Broker on Redis: three kinds of connection (the publish connection,
    the command pool, the subscriber connection) and the parts that use them
    (Publisher, NodeCounts, NodeCommands, Subscriber).

    `timeout` (seconds, 0: none) bounds every command; `node_ttl` (seconds) is
    how long a node's subscriber counts outlive its last report."""

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
        sentinel: SentinelConfig | None = None,
        node_ttl: float = NODE_TTL,
    ) -> None:
        super().__init__()
        self.node = uuid.uuid4().hex[:16]
        self._reactor = reactor
        self._address = address
        self._keys = keys = Keys(prefix)
        self._history_size = history_size
        self._meta_ttl = meta_ttl(history_ttl)
        self._epoch = ""
        self._ready = Waiters()
        self._readiness = LoopingCall(self._check_ready)
        self._readiness.clock = reactor

        self._sentinel: Any = None
        endpoint: IStreamClientEndpoint
        if sentinel is not None:
            sentinels, master = sentinel
            assert master is not None
            self._sentinel = txredisapi.Sentinel(list(sentinels))
            endpoint = IStreamClientEndpoint(SentinelMaster(reactor, self._sentinel, master))
            factory: txredisapi.RedisFactory = txredisapi.SentinelConnectionFactory(
                self._sentinel,
                master,
                True,
                None,
                address.db,
                pool_size,
                **CommandPool.options(address, timeout),
            )
        else:
            endpoint = endpoints.clientFromString(reactor, address.endpoint())
            factory = txredisapi.RedisFactory(
                None, address.db, pool_size, **CommandPool.options(address, timeout)
            )
        self._pool = CommandPool(reactor, factory, endpoint, timeout)
        self._connection = PublishConnection(
            reactor,
            endpoint,
            self._handshake,
            timeout,
            require_master=sentinel is not None,
            on_connected=self._check_ready,
        )
        self._publisher = Publisher(
            self._connection, keys, (history_size, history_ttl, IDEMPOTENCY_TTL), self._meta_ttl
        )
        self._counts = NodeCounts(
            reactor, self._pool, keys, self.node, lambda: self._listener.channels(), node_ttl
        )
        self._commands = NodeCommands(
            self._pool, keys, self.node, self._act, reactor=reactor, meta_ttl=self._meta_ttl
        )
        self._subscriber = Subscriber(address, endpoint, keys, self._commands.channels, self)

    def _handshake(self) -> list[bytes]:
        """What a new publish connection runs first (PublishConnection); its
        name tells it in Redis's CLIENT LIST."""
        a = self._address
        commands = []
        if a.password is not None:
            user = (a.username,) if a.username else ()
            commands.append(command("AUTH", *user, a.password))
        if a.db:
            commands.append(command("SELECT", a.db))
        commands.append(command("CLIENT", "SETNAME", f"pushd-publish-{self.node}"))
        commands += (command("SCRIPT", "LOAD", s.source) for s in _PUBLISHING)
        return commands

    # -- life cycle

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._pool.start().addCallback(self._check_ready)
        self._connection.start()
        self._subscriber.start()
        self._counts.start()

    async def _stop(self) -> None:
        if self._readiness.running:
            self._readiness.stop()
        await self.drain()
        await self._counts.stop()
        await gatherResults(
            [self._connection.stop(), self._pool.stop(), self._subscriber.stop()],
            consumeErrors=True,
        )
        if self._sentinel is not None:
            await self._sentinel.disconnect()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self._stop())

    @property
    def connected(self) -> bool:
        return self._connection.connected and self._pool.connected and self._subscriber.connected

    def when_ready(self) -> Deferred[None]:
        d = self._ready.wait(self.connected)
        if not d.called and not self._readiness.running:
            # txredisapi tells when its whole pool is first made, not when one
            # connection is made again: look while someone waits.
            self._readiness.start(READY_CHECK, now=False)
        return d

    def _check_ready(self, result: object = None) -> object:
        if self.connected:
            self._ready.fire()
            if self._readiness.running:
                self._readiness.stop()
        return result

    def abandon(self) -> None:
        self._connection.abandon()

    # -- publishing (publisher.py)

    def publish(
        self, channel: str, data: bytes, idempotency_key: str | None = None
    ) -> Deferred[Published]:
        return self.track(self._publisher.publish(channel, data, idempotency_key))

    def publish_many(
        self, items: list[tuple[str, bytes]], idempotency_key: str | None = None
    ) -> Deferred[list[Published]]:
        return self.track(self._publisher.publish_many(items, idempotency_key))

    def push(
        self, channel: str, entry: bytes, event_list: str, data: bytes
    ) -> Deferred[tuple[bool, Published]]:
        return self.track(self._publisher.push(channel, entry, event_list, data))

    # -- the bus (subscriber.py): SubscriberEvents

    def subscribe(self, channel: str) -> Deferred[None]:
        return self._subscriber.subscribe(channel)

    def unsubscribe(self, channel: str) -> None:
        self._subscriber.unsubscribe(channel)

    def subscribed_channels(self) -> frozenset[str]:
        return self._subscriber.subscribed_channels()

    def bus_message(self, name: str, payload: bytes) -> None:
        if name.startswith("!"):
            self._commands.received(self._keys.bus(name), payload)
        else:
            self._listener.receive(name, payload)

    def bus_error(self, stage: str, name: str) -> None:
        self._listener.bus_error(stage, name)

    def _act(self, command: dict[str, Any]) -> int:
        return self._listener.control(command)

    def resubscribed(self, channel: str) -> None:
        self._listener.resume(channel)

    def subscriber_connected(self) -> None:
        self._check_ready()
        Deferred.fromCoroutine(self._check_epoch()).addErrback(log_failure, "EPOCH")

    async def _check_epoch(self) -> None:
        """Once connected (again): has Redis lost its data since? (epoch.lua)"""
        await self.when_ready()
        keys = [self._keys.epoch, self._keys.lost]
        with suppress(BrokerUnavailable):  # lost again: the next connection asks
            self._epoch = await self._pool.run(
                EPOCH, keys, [self._epoch, uuid.uuid4().hex, self._meta_ttl]
            )

    # -- counts and commands (counts.py, commands.py)

    def subscriber_count(self, channel: str) -> Deferred[int]:
        return self._counts.subscriber_count(channel)

    def control(self, command: dict[str, Any]) -> Deferred[int]:
        return self.track(Deferred.fromCoroutine(self._commands.control(command)))

    # -- history

    def history(self, channel: str, since: str | None, limit: int | None) -> Deferred[History]:
        async def run() -> History:
            count = limit or self._history_size * 2 + 100
            stream = self._keys.history(channel)
            if since is None:
                newest = await self._pool.call(
                    "execute_command", "XREVRANGE", stream, "+", "-", "COUNT", count
                )
                last = newest[0][0] if newest else None
                return History(_messages(newest[::-1]), complete=False, last=last)
            complete, entries, last = await self._pool.run(
                READ_AFTER, [stream, self._keys.meta(channel), self._keys.lost], [since, count]
            )
            return History(_messages(entries), complete=bool(int(complete)), last=last or None)

        return Deferred.fromCoroutine(run())

    def last_id(self, channel: str) -> Deferred[str | None]:
        async def run() -> str | None:
            stream = self._keys.history(channel)
            last = await self._pool.call(
                "execute_command", "XREVRANGE", stream, "+", "-", "COUNT", 1
            )
            return last[0][0] if last else None

        return Deferred.fromCoroutine(run())


#: The scripts of the publish connection, loaded as it connects.
_PUBLISHING = (PUBLISH, PUBLISH_MANY, PUSH)


def _messages(entries: list[Any]) -> list[tuple[str, bytes]]:
    """XRANGE entries `[id, [field, value, ...]]` as (id, data JSON)."""
    messages = []
    for msg_id, fields in entries:
        values = dict(zip(fields[::2], fields[1::2], strict=True))
        messages.append((msg_id, _stored_data(values.get("d"))))
    return messages


def _stored_data(data: Any) -> bytes:
    """An entry's `d` as strict, one-line JSON. pushd stores nothing else, but
    any process can XADD: what is not strict JSON is delivered as its text (a
    JSON string), and JSON with a line break is written again on one line."""
    if data is None:
        return b"null"
    text = data if isinstance(data, str) else bytes(data).decode("utf-8", "replace")
    try:
        value = load_json(text)
    except (ValueError, RecursionError):
        return dump_json(text)
    if "\n" in text or "\r" in text:
        return dump_json(value)
    return text.encode()

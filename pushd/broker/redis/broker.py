"""RedisBroker, the face of the Redis broker (see the package's docstring):
life cycle (connecting, readiness, stopping), the keys of a channel, history
reads, and noticing that Redis lost its data (epoch.lua)."""

from __future__ import annotations

import uuid
from contextlib import suppress
from typing import Any

import txredisapi
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pushd.broker import (
    IDEMPOTENCY_TTL,
    BrokerUnavailable,
    History,
    meta_ttl,
)
from pushd.broker.redis.address import RedisAddress
from pushd.broker.redis.commands import NodeCommands, _Replies
from pushd.broker.redis.counts import COUNTS_REFRESH, NodeCounts
from pushd.broker.redis.publisher import Publisher, _fast_commands
from pushd.broker.redis.scripts import EPOCH, READ_AFTER
from pushd.broker.redis.subscriber import Subscriptions, _Subscriber, _SubscriberFactory
from pushd.message import dump_json, load_json

log = Logger()

__all__ = ["RedisBroker"]


class RedisBroker(Publisher, Subscriptions, NodeCounts, NodeCommands):
    """The Broker on Redis: its jobs from the modules of this package, its state here."""

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
        sentinel: tuple[tuple[tuple[str, int], ...], str | None] | None = None,
    ) -> None:
        super().__init__()
        self._sentinel_config = sentinel
        self._sentinel: Any = None
        self.node = uuid.uuid4().hex[:16]
        self._reactor = reactor
        self._address = address
        self._prefix = prefix
        self._prefix_bytes = prefix.encode()
        self._pool_size = pool_size
        self._timeout = timeout
        self._history_size = history_size
        self._history_args = (str(history_size), str(history_ttl), str(IDEMPOTENCY_TTL))
        self._meta_ttl = str(meta_ttl(history_ttl))
        self._epoch = ""
        self._lost = f"{prefix}!lost"
        self._pool: Any = None
        self._pool_factory: Any = None
        self._sub_factory: Any = None
        self._proto: _Subscriber | None = None
        self._wanted: set[str] = set()
        self._active: set[str] = set()
        self._sent: dict[str, object] = {}
        self._waiters: dict[str, list[Deferred[None]]] = {}
        self._ready_waiters: list[Deferred[None]] = []
        self._reported: dict[str, int] = {}
        self._report_ticks = 0
        # The application's commands reach every node on one pub/sub channel of the
        # subscriber connection ("!" is in no channel name); each node answers on
        # a reply channel of its own.
        self._control_channel = f"{prefix}!control"
        self._reply_channel = f"{prefix}!reply:{self.node}"
        self._replies: dict[str, _Replies] = {}
        self._reporter = LoopingCall(self._report_counts)
        self._reporter.clock = reactor
        self._stuck: dict[Any, Any] = {}
        self._watchdog = LoopingCall(self._check_stuck)
        self._watchdog.clock = reactor

    # -- keys

    def _stream(self, channel: str) -> str:
        return f"{self._prefix}{{{channel}}}:history"

    def _subscribers(self, channel: str) -> str:
        return f"{self._prefix}{{{channel}}}:subscribers"

    def _meta(self, channel: str) -> str:
        """The channel's newest id, kept past its history (publish.lua derives it)."""
        return f"{self._prefix}{{{channel}}}:meta"

    # -- life cycle

    def _endpoint(self) -> Any:
        return endpoints.clientFromString(self._reactor, self._address.endpoint())

    def startService(self) -> None:
        super().startService()
        a = self._address
        options = {
            "isLazy": True,
            "password": a.password,
            "username": a.username,
            "replyTimeout": self._timeout or None,
            "convertNumbers": False,
        }
        self._sub_factory = _SubscriberFactory(self)
        self._sub_factory.password = a.password
        self._sub_factory.username = a.username
        if self._sentinel_config is not None:
            sentinels, master = self._sentinel_config
            self._sentinel = txredisapi.Sentinel(list(sentinels))
            self._pool = self._sentinel.master_for(
                master, dbid=a.db, poolsize=self._pool_size, **options
            )
            self._pool_factory = self._pool._factory
            _fast_commands(self._pool_factory)
            # txredisapi has no Sentinel subscriber: give ours what its
            # Sentinel endpoint asks of a factory (it looks the master up
            # before every connection attempt).
            self._sub_factory.sentinel_manager = self._sentinel
            self._sub_factory.service_name = master
            self._sub_factory.is_master = True
            self._sub_factory.startConnecting(txredisapi._SentinelEndpoint(self._sub_factory))
        else:
            self._pool_factory = txredisapi.RedisFactory(None, a.db, self._pool_size, **options)
            _fast_commands(self._pool_factory)
            self._pool_factory.startConnecting(self._endpoint())
            self._pool = self._pool_factory.handler
            self._sub_factory.startConnecting(self._endpoint())
        self._pool_factory.deferred.addCallback(self._check_ready)
        self._reporter.start(COUNTS_REFRESH, now=False)
        if self._timeout:
            self._watchdog.start(self._timeout, now=False)

    async def _stop(self) -> None:
        await self.drain()
        self._reporter.stop()
        if self._watchdog.running:
            self._watchdog.stop()
        if self._reported and self.connected:
            # Leave the counts at once rather than when they expire.
            with suppress(BrokerUnavailable):
                await self._report(dict.fromkeys(self._reported, 0))
        await gatherResults(
            [self._pool_factory.disconnect(), self._sub_factory.disconnect()],
            consumeErrors=True,
        )
        if self._sentinel is not None:
            await self._sentinel.disconnect()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

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

    async def _check_epoch(self) -> None:
        """Once connected (again): has Redis lost its data since? (EPOCH)"""
        await self.when_ready()
        keys = [f"{self._prefix}!epoch", self._lost]
        with suppress(BrokerUnavailable):  # lost again: the next connection asks
            self._epoch = await self._run(
                EPOCH, keys, [self._epoch, uuid.uuid4().hex, self._meta_ttl]
            )

    def history(self, channel: str, since: str | None, limit: int | None) -> Deferred[History]:
        async def run() -> History:
            count = limit or self._history_size * 2 + 100
            stream = self._stream(channel)
            if since is None:
                newest = await self._call(
                    "execute_command", "XREVRANGE", stream, "+", "-", "COUNT", count
                )
                last = newest[0][0] if newest else None
                return History(_messages(newest[::-1]), complete=False, last=last)
            complete, entries, last = await self._run(
                READ_AFTER, [stream, self._meta(channel), self._lost], [since, count]
            )
            return History(_messages(entries), complete=bool(int(complete)), last=last or None)

        return Deferred.fromCoroutine(run())

    def last_id(self, channel: str) -> Deferred[str | None]:
        async def run() -> str | None:
            last = await self._call(
                "execute_command", "XREVRANGE", self._stream(channel), "+", "-", "COUNT", 1
            )
            return last[0][0] if last else None

        return Deferred.fromCoroutine(run())


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

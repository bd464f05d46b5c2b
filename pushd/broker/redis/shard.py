"""One Redis server of the Redis broker (a shard): its three kinds of
connection and the parts that use them.

With one `--redis` there is one shard; with several, each channel lives on
the shard `sharding.shard_of` names, and every shard has, per process, its
own publish connection, command pool, ONE subscriber connection, scripts,
history, idempotency keys, subscriber counts, epoch (has this Redis lost its
data?) and node-command channels. A shard that is down fails only its own
channels.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import txredisapi
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pushd.broker import IDEMPOTENCY_TTL, BrokerUnavailable, BusListener, PresenceListener
from pushd.broker.redis.address import SentinelMaster, ShardAddress
from pushd.broker.redis.commands import NodeCommands
from pushd.broker.redis.connection import PublishConnection, command
from pushd.broker.redis.counts import NodeCounts, refresh_every
from pushd.broker.redis.keys import Keys
from pushd.broker.redis.pool import CommandPool, PoolFactory, SentinelPoolFactory
from pushd.broker.redis.presence import ShardPresence
from pushd.broker.redis.publisher import Publisher
from pushd.broker.redis.scripts import EPOCH, PUBLISH, PUBLISH_MANY, PUSH, SHARD_MAP
from pushd.broker.redis.subscriber import Subscriber, log_failure
from pushd.waiting import Waiters

log = Logger()

#: The scripts of the publish connection, loaded as it connects.
_PUBLISHING = (PUBLISH, PUBLISH_MANY, PUSH)


@dataclass(frozen=True)
class ShardSettings:
    """What every shard of a broker shares (RedisBroker's options)."""

    keys: Keys
    node: str
    pool_size: int
    timeout: float
    history: tuple[int, int]  # size, TTL (s)
    meta_ttl: int
    node_ttl: float
    #: The shard list's fingerprint (RedisBroker): each shard remembers the
    #: first node's, so a node given another list is told.
    shard_map: str


#: Seconds between looks at the connections while `when_ready` waits.
READY_CHECK = 0.05


class Shard:
    """One shard. `listener` is the broker's BusListener of the moment;
    `local` answers this node's subscriber counts of the shard's channels."""

    def __init__(
        self,
        reactor: Any,
        index: int,
        where: ShardAddress,
        settings: ShardSettings,
        *,
        sentinel: Any,
        listener: Callable[[], BusListener],
        local: Callable[[], dict[str, int]],
        presence: Callable[[], PresenceListener | None] = lambda: None,
        members: Callable[[], dict[str, dict[str, bytes]]] = dict,
    ) -> None:
        self.index = index
        self.name = where.describe()
        self._where = where
        self._settings = settings
        self._listener = listener
        self._ready = Waiters()
        self._readiness = LoopingCall(self._check_ready)
        self._readiness.clock = reactor
        self.epoch = ""
        #: The Redis server's run id, once connected: two shards with one are one server.
        self.run_id = ""
        #: False once this shard was seen holding another node's shard list.
        self.map_agrees = True
        keys, address, timeout = settings.keys, where.address, settings.timeout
        endpoint: IStreamClientEndpoint
        options = CommandPool.options(address, timeout)
        if where.master is not None:
            endpoint = IStreamClientEndpoint(SentinelMaster(reactor, sentinel, where.master))
            factory: txredisapi.RedisFactory = SentinelPoolFactory(
                sentinel, where.master, True, None, address.db, settings.pool_size, **options
            )
        else:
            endpoint = endpoints.clientFromString(reactor, address.endpoint())
            factory = PoolFactory(None, address.db, settings.pool_size, **options)
        self.pool = CommandPool(reactor, factory, endpoint, timeout, shard=self.name)
        self.connection = PublishConnection(
            reactor,
            endpoint,
            self._handshake,
            timeout,
            require_master=where.master is not None,
            on_connected=self._check_ready,
            shard=self.name,
        )
        size, ttl = settings.history
        self.publisher = Publisher(
            self.connection, keys, (size, ttl, IDEMPOTENCY_TTL), settings.meta_ttl
        )
        self.counts = NodeCounts(reactor, self.pool, keys, settings.node, local, settings.node_ttl)
        self.commands = NodeCommands(
            self.pool,
            keys,
            settings.node,
            lambda c: self._listener().control(c),
            reactor=reactor,
            meta_ttl=settings.meta_ttl,
        )
        self.subscriber = Subscriber(
            address, endpoint, keys, self.commands.channels, self, shard=self.name
        )
        self._presence_listener = presence
        self.presence = ShardPresence(
            reactor,
            self.pool,
            keys,
            settings.node,
            ttl=settings.node_ttl,
            refresh=refresh_every(settings.node_ttl),
            members=members,
            listener=presence,
        )

    def _handshake(self) -> list[bytes]:
        """What a new publish connection runs first (PublishConnection); its
        name tells it in Redis's CLIENT LIST."""
        a = self._where.address
        commands = []
        if a.password is not None:
            user = (a.username,) if a.username else ()
            commands.append(command("AUTH", *user, a.password))
        if a.db:
            commands.append(command("SELECT", a.db))
        commands.append(command("CLIENT", "SETNAME", f"pushd-publish-{self._settings.node}"))
        commands += (command("SCRIPT", "LOAD", s.source) for s in _PUBLISHING)
        return commands

    def time_commands(self, histogram: Any) -> None:
        """Time the pool's commands and the publish connection's scripts in
        `histogram`, labelled with this shard's index (as pushd_redis_up)."""
        shard = str(self.index)

        def timer(command: str) -> Any:
            return histogram.labels(shard=shard, command=command)

        self.pool.time(timer)
        self.publisher.time(timer)

    # -- life cycle

    def start(self) -> None:
        self.pool.start().addCallback(self._check_ready)
        self.connection.start()
        self.subscriber.start()
        self.counts.start()
        if self._presence_listener() is not None:
            self.presence.start()

    async def stop(self) -> None:
        if self._readiness.running:
            self._readiness.stop()
        self.presence.stop()
        await self.counts.stop()
        await gatherResults(
            [self.connection.stop(), self.pool.stop(), self.subscriber.stop()],
            consumeErrors=True,
        )

    @property
    def connected(self) -> bool:
        return self.connection.connected and self.pool.connected and self.subscriber.connected

    def when_ready(self) -> Deferred[None]:
        """Fires once the shard's three kinds of connection are made."""
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

    # -- the subscriber connection's events (SubscriberEvents)

    def bus_message(self, name: str, payload: bytes) -> None:
        if name.startswith("!"):
            self.commands.received(self._settings.keys.bus(name), payload)
        else:
            self._listener().receive(name, payload)

    def bus_error(self, stage: str, name: str) -> None:
        self._listener().bus_error(stage, name)

    def resubscribed(self, channel: str) -> None:
        self._listener().resume(channel)

    def subscriber_connected(self) -> None:
        self._check_ready()
        Deferred.fromCoroutine(self._check()).addErrback(log_failure, "EPOCH")

    async def _check(self) -> None:
        """Once connected (again): has this Redis lost its data since
        (epoch.lua)? Do the nodes on it agree on the shard list (shard_map.lua)?"""
        keys, settings = self._settings.keys, self._settings
        await self.when_ready()
        with suppress(BrokerUnavailable):  # lost again: the next connection asks
            self.epoch = await self.pool.run(
                EPOCH, [keys.epoch, keys.lost], [self.epoch, uuid.uuid4().hex, settings.meta_ttl]
            )
            info = await self.pool.call("execute_command", "INFO", "server")
            run_id, self.run_id = self.run_id, _run_id(info)
            if run_id and run_id != self.run_id:
                # Another Redis process answers (a restart, a failover): it may
                # hold an older copy of this node's members than the node has.
                self.presence.rewrite()
            await self.check_map()

    async def check_map(self) -> None:
        """Compare this node's shard list with the one this shard remembers
        (the first node's, for as long as nodes with it keep running); log
        once when they differ and once when they agree again."""
        settings = self._settings
        ttl = max(int(settings.node_ttl * 10), 60)
        mine = f"{self.index}:{settings.shard_map}"
        theirs = await self.pool.run(SHARD_MAP, [settings.keys.shard_map], [mine, ttl])
        agrees = theirs == mine
        if not agrees and self.map_agrees:
            log.error(
                "shard list mismatch: Redis {shard} is shard {mine} to this node, but {theirs} "
                "to the nodes that came first (shard:fingerprint of the --redis list); every "
                "node must be given the same --redis list in the same order",
                shard=self.name,
                mine=mine,
                theirs=theirs,
            )
        elif agrees and not self.map_agrees:
            log.info("shard list of Redis {shard} agrees again", shard=self.name)
        self.map_agrees = agrees


def _run_id(info: Any) -> str:
    """`run_id` of an INFO reply."""
    text = info if isinstance(info, str) else bytes(info).decode("ascii", "replace")
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return line.partition(":")[2].strip()
    return ""

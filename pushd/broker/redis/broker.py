"""RedisBroker, the face of the Redis broker (see the package's docstring):
it makes the shards (shard.py: each a Redis server with its connections and
the parts that use them), routes each channel to its shard
(sharding.shard_of), reads history, and answers for them all."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, cast

import txredisapi
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, gatherResults
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from pushd.broker import (
    IDEMPOTENCY_TTL,
    Broker,
    BrokerUnavailable,
    History,
    IdempotencyKeyReused,
    OutcomeUnknown,
    PresenceChange,
    PresenceRead,
    Published,
    ShardState,
    fingerprint,
    meta_ttl,
)
from pushd.broker.redis.address import ShardAddress, check_shards
from pushd.broker.redis.counts import NODE_TTL
from pushd.broker.redis.keys import Keys
from pushd.broker.redis.scripts import BIND_KEY, NODE_STATS, READ_AFTER
from pushd.broker.redis.shard import Shard, ShardSettings
from pushd.broker.redis.sharding import shard_of
from pushd.message import dump_json, load_json

log = Logger()

__all__ = ["RedisBroker", "ShardAddress"]

#: Seconds a keyed request waits, at most, to bind its key on the key's shard.
BIND_TIMEOUT = 2.0


class RedisBroker(Broker):
    """The Broker on Redis: one or more shards (`shards`, in --redis order;
    every node must be given the same list). `sentinels` are the Sentinels'
    addresses when the shards are masters they name. `timeout` (seconds, 0:
    none) bounds every command; `node_ttl` (seconds) is how long a node's
    subscriber counts outlive its last report."""

    def __init__(
        self,
        reactor: Any,
        shards: Sequence[ShardAddress],
        *,
        prefix: str = "pushd:",
        pool_size: int = 10,
        timeout: float = 5.0,
        history_size: int = 100,
        history_ttl: int = 3600,
        sentinels: Sequence[tuple[str, int]] = (),
        node_ttl: float = NODE_TTL,
    ) -> None:
        super().__init__()
        if not shards:
            raise ValueError("no Redis shard")
        check_shards(shards)
        self._reactor = reactor
        self._keys = Keys(prefix)
        self._history_size = history_size
        self._sentinel: Any = txredisapi.Sentinel(list(sentinels)) if sentinels else None
        settings = ShardSettings(
            keys=self._keys,
            node=self.node,
            pool_size=pool_size,
            timeout=timeout,
            history=(history_size, history_ttl),
            meta_ttl=meta_ttl(history_ttl),
            node_ttl=node_ttl,
            shard_map=shard_map(shards),
        )
        self._shards = [
            Shard(
                reactor,
                index,
                where,
                settings,
                sentinel=self._sentinel,
                listener=lambda: self._listener,
                local=lambda index=index: self._local_counts(index),  # type: ignore[misc]
                presence=lambda: self._presence,
                members=lambda index=index: self._local_members(index),  # type: ignore[misc]
            )
            for index, where in enumerate(shards)
        ]
        self._map_check = LoopingCall(self._check_maps)
        self._map_check.clock = reactor
        self._map_every = node_ttl
        self._same_server_said = False
        self._stats_foreign_said = False

    def _shard(self, channel: str) -> Shard:
        return self._shards[_shard_index(channel, len(self._shards))]

    def _local_counts(self, index: int) -> dict[str, int]:
        """This node's subscriber counts of the channels of shard `index`."""
        counts = self._listener.channels()
        n = len(self._shards)
        if n == 1:
            return counts
        return {c: k for c, k in counts.items() if _shard_index(c, n) == index}

    def _local_members(self, index: int) -> dict[str, dict[str, bytes]]:
        """This node's presence members of the channels of shard `index`."""
        if self._presence is None:
            return {}
        members = self._presence.members()
        n = len(self._shards)
        if n == 1:
            return members
        return {c: m for c, m in members.items() if _shard_index(c, n) == index}

    # -- life cycle

    def startService(self) -> None:
        Service.startService(self)
        for shard in self._shards:
            shard.start()
        self._map_check.start(self._map_every, now=False)

    async def _stop(self) -> None:
        if self._map_check.running:
            self._map_check.stop()
        await self.drain()
        await gatherResults(
            [Deferred.fromCoroutine(shard.stop()) for shard in self._shards],
            consumeErrors=True,
        )
        if self._sentinel is not None:
            await self._sentinel.disconnect()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    @property
    def connected(self) -> bool:
        """Every shard connected."""
        return all(shard.connected for shard in self._shards)

    def shards(self) -> list[ShardState]:
        return [ShardState(s.name, s.connected, s.map_agrees) for s in self._shards]

    def time_commands(self, histogram: Any) -> None:
        for shard in self._shards:
            shard.time_commands(histogram)

    def when_ready(self) -> Deferred[None]:
        """Fires once every shard is connected."""
        d = gatherResults([shard.when_ready() for shard in self._shards])
        return d.addCallback(lambda _: None)

    def _check_maps(self) -> None:
        servers: dict[str, Shard] = {}
        for shard in self._shards:
            first = servers.setdefault(shard.run_id, shard) if shard.run_id else shard
            if first is not shard and not self._same_server_said:
                self._same_server_said = True
                log.error(
                    "the shards {a} and {b} are one Redis server (run id {run_id}): every "
                    "message and node command comes twice; give each shard a server of its own",
                    a=first.name,
                    b=shard.name,
                    run_id=shard.run_id,
                )
            if shard.connected:
                Deferred.fromCoroutine(shard.check_map()).addErrback(
                    lambda f: f.trap(BrokerUnavailable)
                )

    def abandon(self) -> None:
        """Publishes Redis left unanswered fail with OutcomeUnknown (504);
        reads waiting on the command pools (history, counts) fail with
        BrokerUnavailable (503): the pools close, the node is stopping."""
        for shard in self._shards:
            shard.connection.abandon()
            shard.pool.stop()

    # -- publishing (publisher.py, on the channel's shard)

    def publish(
        self, channel: str, data: bytes, idempotency_key: str | None = None
    ) -> Deferred[Published]:
        publisher = self._shard(channel).publisher
        if idempotency_key is None or len(self._shards) == 1:
            return self.track(publisher.publish(channel, data, idempotency_key))

        async def keyed(key: str) -> Published:
            await self._bind(key, fingerprint(b"1", [(channel, data)]))
            return await publisher.publish(channel, data, key)

        return self.track(Deferred.fromCoroutine(keyed(idempotency_key)))

    async def _bind(self, key: str, bound: str) -> None:
        """With several shards, before a keyed request: bind the key to this
        request (`bound`, its fingerprint) on the key's own shard, so that
        another request under it fails with IdempotencyKeyReused whichever
        shards it names, and publishes nothing. The channel's shard keeps the
        answer, as with one shard. While the key's shard is down the request
        goes on unbound (a shard that is down fails only its own channels):
        the channel's shard still answers a repeat of the same request. A
        binding that is not answered within BIND_TIMEOUT fails the request
        with BrokerUnavailable (503, nothing published): whether the key is
        bound to another request is not known, and a publish under it could
        be a second request answered 200."""
        home = self._shard(f"idempotency:{key}")
        if not home.connected:
            return
        bind = [self._keys.idempotency_bind(key)]
        binding = Deferred.fromCoroutine(home.pool.run(BIND_KEY, bind, [bound, IDEMPOTENCY_TTL]))
        try:
            # A frozen key's shard (not yet known to be down) fails its
            # requests after BIND_TIMEOUT, not --redis-timeout.
            # Cancelled by the timeout, the pool's call answers BrokerUnavailable:
            # said as what it is, a timeout.
            bound_here = int(
                await binding.addTimeout(
                    BIND_TIMEOUT, self._reactor, onTimeoutCancel=_binding_timed_out
                )
            )
        except BrokerUnavailable:
            return
        except TimeoutError:
            raise BrokerUnavailable("the Idempotency-Key's shard did not answer") from None
        if not bound_here:
            raise IdempotencyKeyReused("the Idempotency-Key was first used with another request")

    def publish_many(
        self, items: list[tuple[str, bytes]], idempotency_key: str | None = None
    ) -> Deferred[list[Published]]:
        n = len(self._shards)
        if n == 1:
            return self.track(self._shards[0].publisher.publish_many(items, idempotency_key))
        return self.track(Deferred.fromCoroutine(self._publish_across(items, idempotency_key)))

    async def _publish_across(
        self, items: list[tuple[str, bytes]], idempotency_key: str | None
    ) -> list[Published]:
        """A batch over several shards: one script a shard, all sent at once,
        after checking every shard is connected (else 503, nothing sent). Each
        shard's part is all or nothing, the batch is not: when one shard fails
        after another stored its part, the answer is OutcomeUnknown (504), and
        a retry under the same Idempotency-Key (bound on every shard to the
        whole batch) settles it. The key is first bound to the batch on its
        own shard (`_bind`): another request under it publishes nothing."""
        n = len(self._shards)
        parts: dict[int, list[int]] = {}
        for position, (channel, _) in enumerate(items):
            parts.setdefault(_shard_index(channel, n), []).append(position)
        down = [self._shards[i].name for i in parts if not self._shards[i].connected]
        if down:
            raise BrokerUnavailable(f"Redis {', '.join(down)} is not connected")
        if idempotency_key is not None:
            await self._bind(idempotency_key, fingerprint(b"n", items))
        if len(parts) == 1:
            (index,) = parts
            return await self._shards[index].publisher.publish_many(items, idempotency_key)
        sent = [
            self._shards[i].publisher.publish_many(
                [items[p] for p in positions], idempotency_key, bound_to=items
            )
            for i, positions in parts.items()
        ]
        results = await DeferredList(sent, consumeErrors=True)
        answers: list[Published | None] = [None] * len(items)
        failures: list[Failure] = []
        for (ok, result), positions in zip(results, parts.values(), strict=True):
            if not ok:
                failures.append(cast(Failure, result))
                continue
            for p, published in zip(positions, result, strict=True):
                answers[p] = published
        if failures:
            if len(failures) == len(sent):
                failures[0].raiseException()
            stored = len(sent) - len(failures)
            raise OutcomeUnknown(
                f"{stored} of the batch's {len(sent)} shards stored their messages: "
                f"{failures[0].getErrorMessage()}"
            )
        return [a for a in answers if a is not None]

    def push(
        self, channel: str, entry: bytes, event_list: str, data: bytes
    ) -> Deferred[tuple[bool, Published]]:
        publisher = self._shard(channel).publisher
        return self.track(publisher.push(channel, entry, event_list, data))

    # -- the bus (subscriber.py, on the channel's shard)

    def subscribe(self, channel: str) -> Deferred[None]:
        return self._shard(channel).subscriber.subscribe(channel)

    def unsubscribe(self, channel: str) -> None:
        self._shard(channel).subscriber.unsubscribe(channel)

    def subscribed_channels(self) -> frozenset[str]:
        if len(self._shards) == 1:
            return self._shards[0].subscriber.subscribed_channels()
        return frozenset().union(*(s.subscriber.subscribed_channels() for s in self._shards))

    # -- counts and commands (counts.py, commands.py)

    def subscriber_count(self, channel: str) -> Deferred[int]:
        # Reads too are waited for (drain) by a stopping node, and answered.
        return self.track(self._shard(channel).counts.subscriber_count(channel))

    def control(self, command: dict[str, Any]) -> Deferred[int]:
        """Every node subscribes to the commands of every shard: a command
        about a channel goes through the channel's shard, any other through
        the first shard that is connected."""
        channel = command.get("channel")
        if isinstance(channel, str):
            shard = self._shard(channel)
        else:
            shard = next((s for s in self._shards if s.connected), self._shards[0])
        return self.track(Deferred.fromCoroutine(shard.commands.control(command)))

    def node_stats(self, snapshot: bytes, ttl: float) -> Deferred[list[bytes]]:
        """On the first shard (node_stats.lua): BrokerUnavailable while it is down."""

        async def run() -> list[bytes]:
            args = [self.node, max(1, int(ttl * 1000)), snapshot]
            answer = await self._shards[0].pool.run(NODE_STATS, [self._keys.stats], args)
            if not isinstance(answer, list):
                if not self._stats_foreign_said:
                    self._stats_foreign_said = True
                    log.error(
                        "{key} holds another type than pushd's stats hash: the admin "
                        "console shows this node alone until it is deleted",
                        key=self._keys.stats,
                    )
                raise BrokerUnavailable(f"{self._keys.stats} holds another type")
            return list(answer)

        return Deferred.fromCoroutine(run())

    # -- presence (presence.py, on the channel's shard)

    def update_presence(self, changes: dict[str, PresenceChange]) -> Deferred[None]:
        by_shard: dict[int, dict[str, PresenceChange]] = {}
        for channel, change in changes.items():
            index = _shard_index(channel, len(self._shards))
            by_shard.setdefault(index, {})[channel] = change
        writes = [self._shards[i].presence.update(c) for i, c in by_shard.items()]
        return gatherResults(writes).addCallback(lambda _: None)

    def presence(self, channel: str, limit: int) -> Deferred[PresenceRead]:
        shard = self._shard(channel).presence
        return self.track(Deferred.fromCoroutine(shard.read(channel, limit)))

    def announce(self, channel: str, payload: bytes) -> Deferred[None]:
        return Deferred.fromCoroutine(self._shard(channel).presence.announce(channel, payload))

    def leave_presence(self) -> Deferred[None]:
        leaving = [Deferred.fromCoroutine(s.presence.leave()) for s in self._shards if s.connected]
        return gatherResults(leaving, consumeErrors=True).addBoth(lambda _: None)

    # -- history (the channel's shard's command pool)

    def history(self, channel: str, since: str | None, limit: int | None) -> Deferred[History]:
        async def run() -> History:
            pool = self._shard(channel).pool
            count = limit or self._history_size * 2 + 100
            stream = self._keys.history(channel)
            if since is None:
                newest = await pool.call(
                    "execute_command", "XREVRANGE", stream, "+", "-", "COUNT", count
                )
                last = newest[0][0] if newest else None
                return History(_messages(newest[::-1]), complete=False, last=last)
            complete, entries, last = await pool.run(
                READ_AFTER, [stream, self._keys.meta(channel), self._keys.lost], [since, count]
            )
            return History(_messages(entries), complete=bool(int(complete)), last=last or None)

        return self.track(Deferred.fromCoroutine(run()))

    def last_id(self, channel: str) -> Deferred[str | None]:
        async def run() -> str | None:
            stream = self._keys.history(channel)
            last = await self._shard(channel).pool.call(
                "execute_command", "XREVRANGE", stream, "+", "-", "COUNT", 1
            )
            return last[0][0] if last else None

        return self.track(Deferred.fromCoroutine(run()))


def shard_map(shards: Sequence[ShardAddress]) -> str:
    """The fingerprint of a shard list: the first 16 hex digits of SHA-1 of
    the shards' descriptions in order, one a line."""
    text = "\n".join(where.describe() for where in shards)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@lru_cache(maxsize=65536)
def _binding_timed_out(result: object, timeout: float) -> Failure:
    return Failure(TimeoutError(f"no answer within {timeout} s"))


def _shard_index(channel: str, shards: int) -> int:
    return shard_of(channel, shards)


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

"""Presence on one shard (pushd.presence is the node's side).

Layout, on the channel's shard:
- `<prefix>{<channel>}:presence`, a hash: client id (`<node id>.<n>`) ->
  stored member (pushd.broker.members), every node's members of the channel;
- `<prefix>!nodes`, a sorted set: node id -> when (ms) the node is taken for
  dead; each node refreshes its own every `refresh` seconds (and with every
  write), so a member counts only while its node is alive: a node that dies
  stops counting within `ttl` seconds (`--node-ttl`), and a stopping node at
  once (its entry set to 0);
- `<prefix>!presence:<node id>`, a set: the hashes that node has members in;
- `<prefix>!reaping`, a sorted set: dead nodes being removed.

Reaping: every node, each `refresh`, claims dead nodes (presence_claim.lua:
one node gets each), removes their members hash by hash
(presence_drop.lua) and announces their leaves (PresenceListener.departed).
A reaper that dies leaves its lease to run out; another takes over.

A node's writes are serialised (one in flight a shard): a leave never
overtakes its join on another pool connection. When a write fails, or the node
finds itself without an entry (taken for dead while cut off, or Redis lost its
data), it writes all of its members again from its own (`members`), removing
what Redis holds of it first, and announces the difference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pushd.broker import BrokerUnavailable, PresenceChange, PresenceListener, PresenceRead
from pushd.broker.redis.keys import Keys
from pushd.broker.redis.pool import CommandPool
from pushd.broker.redis.scripts import (
    PRESENCE_CLAIM,
    PRESENCE_DROP,
    PRESENCE_READ,
    PRESENCE_UPDATE,
)
from pushd.message import is_channel
from pushd.waiting import Waiters

log = Logger()

#: Fields one script call writes at most (keeps each call short for Redis).
WRITE_BATCH = 500
#: Hashes one drop call takes at most.
DROP_BATCH = 50
#: Dead nodes one tick claims at most.
CLAIM_BATCH = 4


def _bytes(value: Any) -> bytes:
    """txredisapi decodes what is UTF-8 into str: back to the bytes Redis holds."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return bytes(value)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else bytes(value).decode("utf-8", "replace")


class ShardPresence:
    """Presence on one shard: this node's writes (`update`), reads, events
    (`announce`), liveness and reaping (`start`: every `refresh` seconds).
    `members` answers this node's members of the shard's channels."""

    def __init__(
        self,
        reactor: IReactorTime,
        pool: CommandPool,
        keys: Keys,
        node: str,
        *,
        ttl: float,
        refresh: float,
        members: Callable[[], dict[str, dict[str, bytes]]],
        listener: Callable[[], PresenceListener | None],
    ) -> None:
        self._pool = pool
        self._keys = keys
        self._node = node
        self._ttl_ms = int(ttl * 1000)
        self._lease_ms = int(max(10.0, ttl) * 1000)
        self._members = members
        self._listener = listener
        self._pending: dict[str, PresenceChange] = {}
        self._waiting: list[Deferred[None]] = []
        self._writing = False
        #: Write everything again before anything else (see the module's docstring).
        self._rewrite = False
        #: Whether a write made this node's entry already.
        self._registered = False
        #: Keys of another type where a presence hash should be (logged once).
        self._foreign: set[str] = set()
        self._refresh_due = False
        #: Set once the node stops: nothing more is written.
        self._left = False
        self._idle = Waiters()
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = reactor
        self._refresh = refresh

    def start(self) -> None:
        self._ticker.start(self._refresh, now=False)

    def stop(self) -> None:
        if self._ticker.running:
            self._ticker.stop()

    # -- this node's writes, in order

    def update(self, changes: dict[str, PresenceChange]) -> Deferred[None]:
        """Write `changes` after what is waiting; fires once written (a
        failure is not passed on: everything is written again later)."""
        for channel, change in changes.items():
            self._pending.setdefault(channel, PresenceChange()).merge(change)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        self._kick()
        return d

    def _kick(self) -> None:
        if not self._writing and not self._left:
            self._writing = True
            Deferred.fromCoroutine(self._write_all()).addErrback(
                lambda f: log.failure("writing presence failed", f)
            )

    async def _write_all(self) -> None:
        """Write what waits, one call after the other, until nothing does."""
        try:
            while self._pending or self._rewrite or self._refresh_due:
                waiting, self._waiting = self._waiting, []
                self._refresh_due = False
                try:
                    if self._rewrite:
                        self._rewrite = False
                        self._pending = {}
                        await self._write_again()
                    else:
                        changes, self._pending = self._pending, {}
                        self._rewrite = await self._write(changes)
                except BrokerUnavailable:
                    self._rewrite = True  # the next tick tries again
                    return
                finally:
                    for d in waiting:
                        d.callback(None)
        finally:
            self._writing = False
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)
            self._idle.fire()

    async def _write(self, changes: dict[str, PresenceChange]) -> bool:
        """Write `changes` (and refresh this node's entry); True when the node
        had no entry."""
        calls = list(self._calls(changes)) or [(self._fixed_keys(), self._head())]
        new = False
        for keys, args in calls:
            answer = await self._pool.run(PRESENCE_UPDATE, keys, args)
            new |= bool(int(answer[0]))
            for key in map(_text, answer[1] or ()):
                if key not in self._foreign:
                    self._foreign.add(key)
                    log.warn(
                        "{key} holds another type than pushd's presence hash: its channel "
                        "has no presence until it is deleted",
                        key=key,
                    )
        # The first write of this node makes its entry: nothing to write again.
        new, self._registered = new and self._registered, True
        return new

    def _fixed_keys(self) -> list[str]:
        return [self._keys.nodes, self._keys.node_presence(self._node)]

    def _head(self) -> list[Any]:
        return [self._node, self._ttl_ms]

    def _calls(self, changes: dict[str, PresenceChange]) -> Iterator[tuple[list[str], list[Any]]]:
        """The script calls of `changes`: at most about WRITE_BATCH fields each."""
        keys, args, size = self._fixed_keys(), self._head(), 0
        for channel, change in changes.items():
            joins = list(change.joins.items())
            leaves = list(change.leaves)
            while True:
                room = max(1, WRITE_BATCH - size)
                sets, joins = joins[:room], joins[room:]
                dels, leaves = leaves[: room - len(sets)], leaves[room - len(sets) :]
                keys.append(self._keys.presence(channel))
                args += ["1" if change.present else "0", len(sets), len(dels)]
                for client, value in sets:
                    args += [client, value]
                args += dels
                size += len(sets) + len(dels) + 1
                if size >= WRITE_BATCH:
                    yield keys, args
                    keys, args, size = self._fixed_keys(), self._head(), 0
                if not joins and not leaves:
                    break
        if len(keys) > 2:
            yield keys, args

    async def _write_again(self) -> None:
        """Write all of this node's members of the shard again, after removing
        what Redis holds of it; announce the difference."""
        own = await self._pool.call("smembers", self._keys.node_presence(self._node))
        mine = self._members()
        channels = set(mine)
        for key in own or ():
            channel = self._keys.presence_channel(_text(key))
            if channel is not None and is_channel(channel):
                channels.add(channel)
        # This node's entry first: a reaper that comes after finds it alive.
        await self._write({})
        ordered = sorted(channels)
        for start in range(0, len(ordered), DROP_BATCH):
            batch = ordered[start : start + DROP_BATCH]
            removed = await self._drop(self._node, "own", batch)
            current = {c: dict(mine.get(c, {})) for c in batch}
            await self._write(
                {c: PresenceChange(joins=m, present=bool(m)) for c, m in current.items()}
            )
            listener = self._listener()
            if removed is None or listener is None:
                continue
            for channel, before in zip(batch, removed, strict=True):
                now = current[channel]
                gone = [v for client, v in before.items() if client not in now]
                came = [v for client, v in now.items() if client not in before]
                if gone:
                    listener.departed(channel, gone)
                if came:
                    listener.arrived(channel, came)

    async def _drop(
        self, node: str, mode: str, channels: list[str]
    ) -> list[dict[str, bytes]] | None:
        """Remove `node`'s members of `channels` (presence_drop.lua): what was
        removed, per channel; None when a reaped node turned out alive."""
        keys = [
            self._keys.nodes,
            self._keys.reaping,
            self._keys.node_presence(node),
            *(self._keys.presence(c) for c in channels),
        ]
        answer = await self._pool.run(PRESENCE_DROP, keys, [node, mode])
        if not isinstance(answer, list):
            return None
        removed = []
        for flat in answer:
            pairs = list(flat) if isinstance(flat, list) else []
            removed.append(
                {_text(pairs[i]): _bytes(pairs[i + 1]) for i in range(0, len(pairs) - 1, 2)}
            )
        return removed

    def rewrite(self) -> None:
        """Write all of this node's members again, soon: Redis may have lost
        them or come back from an older copy (another server answers)."""
        if self._listener() is None:
            return  # no presence kept here
        self._rewrite = True
        self._kick()

    # -- reads and events

    async def read(self, channel: str, limit: int) -> PresenceRead:
        keys = [self._keys.presence(channel), self._keys.nodes]
        count, users, values = await self._pool.run(PRESENCE_READ, keys, [limit])
        return PresenceRead(int(count), int(users), [_bytes(v) for v in values or ()])

    async def announce(self, channel: str, payload: bytes) -> None:
        await self._pool.call("publish", self._keys.bus(channel), payload)

    async def leave(self) -> None:
        """This node stops: its entry expires now (readers stop counting its
        members; another node reaps them). After the write in flight, which
        would otherwise refresh the entry again."""
        self.stop()
        self._left = True
        await self._idle.wait(not self._writing)
        await self._pool.call("execute_command", "ZADD", self._keys.nodes, "XX", 0, self._node)

    # -- every `refresh` seconds

    def _tick(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._tick_once())
        d.addErrback(lambda f: f.trap(BrokerUnavailable))
        d.addErrback(lambda f: log.failure("presence upkeep failed", f))
        return d

    async def _tick_once(self) -> None:
        if not self._pool.connected:
            return
        # A write, even of nothing, refreshes this node's entry.
        self._refresh_due = True
        self._kick()
        await self.reap()

    async def reap(self) -> None:
        """Remove the members of the dead nodes this node claims, and announce
        their leaves."""
        claimed = await self._pool.run(
            PRESENCE_CLAIM, [self._keys.nodes, self._keys.reaping], [self._lease_ms, CLAIM_BATCH]
        )
        for node in map(_text, claimed or ()):
            if node == self._node:
                continue
            own = await self._pool.call("smembers", self._keys.node_presence(node))
            channels = sorted(
                c
                for c in (self._keys.presence_channel(_text(k)) for k in own or ())
                if c is not None and is_channel(c)
            )
            log.info(
                "node {node} is gone: removing its members of {n} presence channels",
                node=node,
                n=len(channels),
            )
            # At least one call: it also ends the reaping of a node with nothing left.
            for start in range(0, max(1, len(channels)), DROP_BATCH):
                batch = channels[start : start + DROP_BATCH]
                removed = await self._drop(node, "reap", batch)
                if removed is None:
                    break  # alive again
                listener = self._listener()
                for channel, gone in zip(batch, removed, strict=True):
                    if gone and listener is not None:
                        listener.departed(channel, list(gone.values()))

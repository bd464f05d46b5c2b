"""Presence: who is in a channel, on every node (shared/protocol.md, "Presence").

Each subscription to a channel matching `--presence` (or `--join-leave`) is a
member `{"client": <connection id>, "user": <sub or null>, "info": <claim or
null>}`. This node keeps its own members (`members`): they are the truth the
broker's copy is written from, in order, a batch per reactor turn (a storm of
connects is a few writes, not one each). The broker keeps every node's members
(the Redis broker: a hash per channel, each node alive while it refreshes its
entry; pushd.broker.redis.presence) and reads them back for a query.

Join and leave events (`--join-leave`) are coalesced per channel: an event
waits up to JOIN_LEAVE_WINDOW seconds; a client that comes and goes within
that time is never announced; and each window a node sends at most
JOIN_LEAVE_BURST events of a channel, as ONE bus payload (one write per
subscriber), the rest in later windows, in order. A reconnect storm therefore
reaches each subscriber as at most JOIN_LEAVE_BURST / JOIN_LEAVE_WINDOW events
a second per node, and nothing is dropped: a node's queue holds at most one
event per member that came or went.

Queries are shared and reused: the queries of a channel on this node take
the answer of a read (serialised once) begun after this node last changed the
channel's members, while it is under way and for QUERY_CACHE seconds after it
began. So a channel's subscribers, however many and however eager, make Redis
read it at most about once a second per node (a read walks every member:
6.5 ms of Redis for 10,000), and a client still finds its own join, and not its
own leave, in the answer. Other nodes' changes show within QUERY_CACHE.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from pushd.auth import matches
from pushd.broker import Broker, BrokerUnavailable, PresenceChange, PresenceRead
from pushd.broker.members import split, stored, tombstone
from pushd.message import dump_json, load_json, presence_event, presence_payload

log = Logger()

#: Seconds a join or leave event waits, at most, before it is sent (and
#: within which a join and the leave of the same client cancel out).
JOIN_LEAVE_WINDOW = 0.25
#: Events of one channel one node sends per window, at most.
JOIN_LEAVE_BURST = 50
#: Seconds a query's answer is reused on this node (see the module's docstring).
QUERY_CACHE = 1.0


class Presence:
    """This node's presence: which channels have it (`tracks`), this node's
    members, join/leave events, and queries. A PresenceListener of the broker."""

    def __init__(
        self,
        broker: Broker,
        *,
        patterns: tuple[str, ...],
        join_leave: tuple[str, ...] = (),
        max_list: int = 1000,
        clock: Any,
        window: float = JOIN_LEAVE_WINDOW,
        burst: int = JOIN_LEAVE_BURST,
    ) -> None:
        self._broker = broker
        self._clock = clock
        # --join-leave channels have presence too: events of what nobody keeps make no sense.
        self._patterns = patterns + join_leave
        self._join_leave = join_leave
        self.max_list = max_list
        self._tracked: dict[str, bool] = {}
        self._announced: dict[str, bool] = {}
        self._local: dict[str, dict[str, bytes]] = {}
        self._changes: dict[str, PresenceChange] = {}
        self._written: list[Deferred[None]] = []
        self._write_call: Any = None
        self._writing = False
        #: Writes this node finished: a query shares only a read begun after
        #: the writes its asker saw finish (its own join included).
        self._writes_done = 0
        #: Channel -> `_writes_done` after the last write of its members.
        self._stamps: dict[str, int] = {}
        #: Channel -> (when its read began, its stamp then, the answer).
        self._answers: dict[str, tuple[float, int, bytes]] = {}
        self._queries: dict[str, tuple[int, list[Deferred[bytes]]]] = {}
        self._clients = itertools.count(1)
        #: channel -> clients whose leave waits to be announced (stored as tombstones).
        self._tombstones: dict[str, set[str]] = {}
        self._events = Announcer(broker, clock, window, burst, said=self._said)
        self._stopping = False
        broker.attach_presence(self)

    # -- which channels

    def tracks(self, channel: str) -> bool:
        """Whether `channel` has presence (matches --presence or --join-leave)."""
        return _cached(self._tracked, channel, self._patterns)

    def announces(self, channel: str) -> bool:
        """Whether `channel`'s subscribers hear joins and leaves (--join-leave)."""
        return _cached(self._announced, channel, self._join_leave)

    def new_client(self) -> str:
        """A connection id unique among the nodes: `<node id>.<n>`."""
        return f"{self._broker.node}.{next(self._clients)}"

    # -- this node's members

    def join(self, channel: str, client: str, user: str | None, info: bytes) -> Deferred[None]:
        """`client` (a subscription of `user`, with `info` as compact JSON) is a
        member of `channel` from now on; fires once the broker has it (or
        could not take it: it is written again later). Never fails."""
        if self._stopping:
            return succeed(None)
        value = stored(client, user, info)
        self._local.setdefault(channel, {})[client] = value
        self._untomb(channel, client)  # back before its leave was said
        change = self._change(channel)
        change.join(client, value)
        change.present = True
        if self.announces(channel):
            self._events.add(channel, client, b"join", split(value)[1])
        return self._write_soon()

    def leave(self, channel: str, client: str) -> None:
        """`client` left `channel` (unsubscribed, or its connection closed)."""
        members = self._local.get(channel)
        value = members.pop(client, None) if members is not None else None
        if value is None or self._stopping:
            return
        if not members:
            del self._local[channel]
        change = self._change(channel)
        if self.announces(channel):
            # Until its leave is announced, the member stays stored as a
            # tombstone (not counted): should this node die first, the node
            # that reaps it announces the leave (pushd.broker.members).
            change.join(client, tombstone(value))
            self._tombstones.setdefault(channel, set()).add(client)
            self._events.add(channel, client, b"leave", split(value)[1])
        else:
            change.leave(client)
        change.present = channel in self._local or channel in self._tombstones
        self._write_soon()

    def _said(self, channel: str, clients: list[str]) -> None:
        """The leaves of `clients` were announced (or need not be): their
        tombstones go."""
        if self._stopping:
            return
        change = self._change(channel)
        for client in clients:
            if self._untomb(channel, client):
                change.leave(client)
        change.present = channel in self._local or channel in self._tombstones
        self._write_soon()

    def _untomb(self, channel: str, client: str) -> bool:
        """`client` is no tombstone of `channel` (any more); whether it was."""
        tombstones = self._tombstones.get(channel)
        if tombstones is None or client not in tombstones:
            return False
        tombstones.discard(client)
        if not tombstones:
            del self._tombstones[channel]
        return True

    def _change(self, channel: str) -> PresenceChange:
        change = self._changes.get(channel)
        if change is None:
            change = self._changes[channel] = PresenceChange()
        return change

    def _write_soon(self) -> Deferred[None]:
        """Fires once what changed up to now is written: one write in flight
        at a time, in order, the changes of the meantime in the next."""
        d: Deferred[None] = Deferred()
        self._written.append(d)
        if self._write_call is None and not self._writing:
            self._write_call = self._clock.callLater(0, self._write)
        return d

    def _write(self) -> None:
        self._write_call = None
        changes, self._changes = self._changes, {}
        waiting, self._written = self._written, []
        self._writing = True

        def done(result: object) -> None:
            self._writing = False
            if isinstance(result, Failure) and not result.check(BrokerUnavailable):
                log.failure("writing presence failed", result)
            self._writes_done += 1
            if len(self._stamps) > 10_000:
                # Forgetting stamps would make old answers look current: both go.
                self._stamps.clear()
                self._answers.clear()
            for channel in changes:
                self._stamps[channel] = self._writes_done
            for d in waiting:
                d.callback(None)
            if self._written and self._write_call is None and not self._stopping:
                self._write_call = self._clock.callLater(0, self._write)

        if changes:
            self._broker.update_presence(changes).addBoth(done)
        else:
            done(None)

    def members(self) -> dict[str, dict[str, bytes]]:
        """PresenceListener.members: this node's members, channel -> client -> value."""
        return self._local

    def count(self) -> int:
        """This node's members, all channels."""
        return sum(len(m) for m in self._local.values())

    def events_waiting(self) -> int:
        """Join and leave events waiting for their window."""
        return self._events.waiting()

    def departed(self, channel: str, values: list[bytes]) -> None:
        """PresenceListener.departed: announce the leaves of members gone unseen."""
        self._announce(channel, b"leave", values)

    def arrived(self, channel: str, values: list[bytes]) -> None:
        """PresenceListener.arrived: announce members written again."""
        self._announce(channel, b"join", values)

    def _announce(self, channel: str, kind: bytes, values: list[bytes]) -> None:
        if self._stopping or not self.announces(channel):
            return
        for value in values:
            member = _member(value)
            if member is not None:
                self._events.add(channel, member[0], kind, member[1])

    # -- queries

    def query(self, channel: str) -> Deferred[bytes]:
        """The answer to a presence query of `channel` (a tracked one):
        `{"channel":..,"count":..,"users":..,"clients":[member...]}` as JSON,
        read after this node's own changes are written (a client that just
        left is not listed). Fails with BrokerUnavailable when the broker
        cannot tell."""
        if self._writing or self._write_call is not None:
            return self._write_soon().addCallback(lambda _: self._read(channel))
        return self._read(channel)

    def _read(self, channel: str) -> Deferred[bytes]:
        stamp, now = self._stamps.get(channel, 0), self._clock.seconds()
        cached = self._answers.get(channel)
        if cached is not None and cached[1] == stamp and now - cached[0] < QUERY_CACHE:
            return succeed(cached[2])
        d: Deferred[bytes] = Deferred()
        shared = self._queries.get(channel)
        if shared is not None and shared[0] == stamp:
            shared[1].append(d)
            return d
        waiting = [d]
        self._queries[channel] = (stamp, waiting)
        read = self._broker.presence(channel, self.max_list)
        read.addBoth(self._answered, channel, waiting, (now, stamp))
        return d

    def _answered(
        self,
        result: PresenceRead | Failure,
        channel: str,
        waiting: list[Any],
        begun: tuple[float, int],
    ) -> None:
        if self._queries.get(channel, (0, None))[1] is waiting:
            del self._queries[channel]
        if isinstance(result, PresenceRead):
            answer: bytes | Failure
            try:
                body = self._body(channel, result)
            except Exception:
                answer = Failure()
            else:
                answer = body
                self._keep(channel, begun, body)
        else:
            answer = result
        for d in waiting:
            if isinstance(answer, Failure):
                d.errback(answer)
            else:
                d.callback(answer)

    def _keep(self, channel: str, begun: tuple[float, int], answer: bytes) -> None:
        answers = self._answers
        if len(answers) > 1024:
            horizon = self._clock.seconds() - QUERY_CACHE
            for old in [c for c, (when, _, _) in answers.items() if when < horizon]:
                del answers[old]
        answers[channel] = (*begun, answer)

    def _body(self, channel: str, read: PresenceRead) -> bytes:
        clients = []
        for value in read.values[: self.max_list]:
            member = _member(value)
            if member is not None:
                clients.append(load_json(member[1]))
        return dump_json(
            {"channel": channel, "count": read.count, "users": read.users, "clients": clients}
        )

    # -- stopping

    async def stop(self) -> None:
        """The node stops: no more writes or events; the broker lets every
        node know this node's members are gone (their leaves are announced by
        another node)."""
        self._stopping = True
        await self._events.stop()
        if self._write_call is not None and self._write_call.active():
            self._write_call.cancel()
        self._write_call = None
        for d in self._written:
            d.callback(None)
        self._written = []
        if self._local:
            try:
                await self._broker.leave_presence()
            except Exception:
                log.failure("leaving presence failed")


def _cached(cache: dict[str, bool], channel: str, patterns: tuple[str, ...]) -> bool:
    known = cache.get(channel)
    if known is None:
        if len(cache) > 4096:
            cache.clear()
        known = cache[channel] = bool(patterns) and matches(patterns, channel)
    return known


def _member(value: bytes) -> tuple[str, bytes] | None:
    """(client id, member JSON) of a stored value, or None when it is not a
    member pushd wrote (the bus is untrusted: anything may be in it)."""
    try:
        member = load_json(split(value)[1])
    except ValueError:
        log.warn("a stored presence member is not one: {value!r}", value=value[:200])
        return None
    if not isinstance(member, dict) or not isinstance(member.get("client"), str):
        log.warn("a stored presence member is not one: {value!r}", value=value[:200])
        return None
    return member["client"], dump_json(member)


class Announcer:
    """Join and leave events waiting to be sent, per channel (see the module's
    docstring): at most `burst` events of a channel every `window` seconds.

    What subscribers may have heard decides what may be left unsaid: a join
    and the leave of the same client cancel out only when that join was the
    first word of the client on the channel (nobody can have heard of it);
    otherwise the latest event of a client replaces the one waiting, so a
    subscriber's list, kept by `client`, ends up as the members are."""

    def __init__(
        self,
        broker: Broker,
        clock: Any,
        window: float,
        burst: int,
        said: Callable[[str, list[str]], None] = lambda channel, clients: None,
    ) -> None:
        self._said = said
        self._broker = broker
        self._clock = clock
        self._window = window
        self._burst = burst
        #: channel -> client -> (event, member JSON, first word), in the order they came.
        self._queues: dict[str, dict[str, tuple[bytes, bytes, bool]]] = {}
        #: channel -> the clients this node has said something of (joins waiting
        #: or sent, until a leave of theirs is sent or cancels their first join).
        self._spoken: dict[str, set[str]] = {}
        self._call: Any = None

    def add(self, channel: str, client: str, kind: bytes, member: bytes) -> None:
        queue = self._queues.setdefault(channel, {})
        spoken = self._spoken.setdefault(channel, set())
        pending = queue.pop(client, None)
        if kind == b"leave" and pending is not None and pending[0] == b"join" and pending[2]:
            # Came and went before a word was sent: nobody heard of it.
            spoken.discard(client)
            self._tidy(channel)
            self._said(channel, [client])
            return
        first = kind == b"join" and client not in spoken
        if kind == b"join":
            spoken.add(client)
        queue[client] = (kind, member, first)
        self._schedule()

    def _tidy(self, channel: str) -> None:
        if not self._queues.get(channel, True):
            del self._queues[channel]
        if not self._spoken.get(channel, True):
            del self._spoken[channel]

    def _schedule(self) -> None:
        if self._call is None and self._queues:
            self._call = self._clock.callLater(self._window, self.flush)

    def flush(self) -> list[Deferred[None]]:
        """Send each channel's next `burst` events (the clock calls it);
        the Deferreds of the sends."""
        self._call = None
        sends = []
        for channel in list(self._queues):
            queue = self._queues[channel]
            taken = list(itertools.islice(queue.items(), self._burst))
            for client, (kind, _, _) in taken:
                del queue[client]
                if kind == b"leave":
                    self._spoken.get(channel, set()).discard(client)
            self._tidy(channel)
            events = [presence_event(kind, channel, member) for _, (kind, member, _) in taken]
            left = [client for client, (kind, _, _) in taken if kind == b"leave"]
            d = self._broker.announce(channel, presence_payload(events))
            if left:
                d.addCallback(self._sent, channel, left)
            sends.append(d.addErrback(self._failed, channel, taken))
        self._schedule()
        return sends

    def _sent(self, _: object, channel: str, left: list[str]) -> None:
        self._said(channel, left)

    def _failed(self, failure: Failure, channel: str, taken: list[Any]) -> None:
        """Not sent (the bus is down): back in front of the queue, unless a
        newer event of the same client came meanwhile; tried next window."""
        if not failure.check(BrokerUnavailable):
            log.failure("announcing joins and leaves of {channel} failed", failure, channel=channel)
        queue = self._queues.get(channel, {})
        merged = {client: event for client, event in taken if client not in queue}
        merged.update(queue)
        if merged:
            self._queues[channel] = merged
            spoken = self._spoken.setdefault(channel, set())
            spoken.update(c for c, (kind, _, _) in merged.items() if kind == b"leave")
        self._schedule()

    async def stop(self) -> None:
        """Send what waits, all of it, now (a stopping node's last words), and
        send nothing more."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        sends: list[Deferred[None]] = []
        # Each flush sends `burst` events of each channel; a send that fails
        # puts its events back, and is not tried again.
        for _ in range(-(-self.waiting() // self._burst)):
            sends += self.flush()
            if self._call is not None and self._call.active():
                self._call.cancel()
            self._call = None
        self._queues.clear()
        self._spoken.clear()
        if sends:
            await gatherResults(sends, consumeErrors=True)

    def waiting(self) -> int:
        """Events waiting, all channels."""
        return sum(len(q) for q in self._queues.values())

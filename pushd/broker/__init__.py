"""The bus and the store behind the hub.

A broker takes publishes (`publish` answers the message id once the message is
stored in the channel's history and on its way to every node), reads history
back for recovery, and feeds the messages of the channels the hub asked for
to the BusListener attached to it (the hub). Two implementations share one contract
(tests/test_broker_contract.py): `redis` (many processes, one Redis) and
`memory` (one process, no Redis).

History entries are linked: each remembers the id of the message published
before it on its channel. Reading "everything after <id>" is therefore provably
complete when the first entry read names <id> as its predecessor (or, with
nothing newer, when <id> is the newest entry): whatever trimmed, expired or
lost the history in between breaks the chain, and recovery says so.

The first message of a channel links to "" (nothing before it). So that a
channel whose history expired does not look new again, a broker remembers a
channel's newest id well past its history (the Redis broker in
`<prefix>{<channel>}:meta`, 10 times the history TTL and at least a day): the
first message of its next history links to it, and its id stays above it.
After the Redis broker saw Redis lose its data (`<prefix>!lost`, see
redis/epoch.lua), a first message with nothing remembered links to "?": something
may be missing before it. Reading after "0-0" ("from the beginning") is
complete when the first retained entry links to "", or when the channel has no
history and nothing was remembered or lost. A `destroy` drops the history and
makes the remembered id "?<id>": the next history links to that, so no resume
from before the destroy and no read after "0-0" is complete (messages of the
channel were removed) until it is forgotten; ids stay above it.

Idempotency: one record per key, bound to the request's `fingerprint`, holding
the first answer; a repeat of the same request answers it again, another
request under the same key fails with IdempotencyKeyReused. Both checks and
the write run in the publishing script itself, so concurrent repeats on many
nodes publish once.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from pushd.waiting import Waiters

log = Logger()

IDEMPOTENCY_TTL = 300
#: How long a channel's newest id is remembered past its history: this many
#: times the history TTL, and at least META_TTL_MIN seconds (a day).
META_TTL_FACTOR = 10
META_TTL_MIN = 86_400
#: Reading after this id is reading from the beginning.
BEGINNING = "0-0"


def meta_ttl(history_ttl: float) -> int:
    return int(max(history_ttl * META_TTL_FACTOR, META_TTL_MIN))


def fingerprint(kind: bytes, items: list[tuple[str, bytes]]) -> str:
    """What an Idempotency-Key is bound to: sha1 (hex) of the kind of request
    (b"1" a single publish, b"n" a batch) and its (channel, data JSON) pairs.
    Unambiguous: neither a channel name nor compact JSON holds a newline."""
    h = hashlib.sha1(kind)
    for channel, data in items:
        h.update(b"\n" + channel.encode() + b"\n" + data)
    return h.hexdigest()


class BrokerUnavailable(Exception):
    """The broker cannot take a publish now; nothing was stored (HTTP 503)."""


class OutcomeUnknown(Exception):
    """The command reached the broker (or may have) but no answer came: the
    publish may or may not be stored (HTTP 504 `outcome_unknown`). A retry with
    the same Idempotency-Key settles it."""


class IdempotencyKeyReused(Exception):
    """The Idempotency-Key was first used with another request (other endpoint,
    channel(s) or body): nothing was published (HTTP 422)."""


@dataclass(frozen=True)
class Published:
    id: str
    #: True when an Idempotency-Key matched an earlier publish: nothing was published now.
    repeated: bool = False


@dataclass(frozen=True)
class History:
    """Retained messages of one channel, oldest first, as (id, data JSON)."""

    messages: list[tuple[str, bytes]] = field(default_factory=list)
    #: For a read after an id: True only when no message after it is missing
    #: (after "0-0": when no message of the channel was ever trimmed or expired).
    complete: bool = False
    #: The channel's newest retained id when it was read (None: no history).
    #: A subscription's `position`; also tells a `since` ahead of the channel.
    last: str | None = None


@dataclass(frozen=True)
class PresenceRead:
    """A presence channel's members on every node, as the broker read them."""

    #: Members (subscriptions), exact.
    count: int
    #: Distinct non-null users among them, exact.
    users: int
    #: The stored values (pushd.broker.members) of at most the `limit` asked for.
    values: list[bytes]


@dataclass
class PresenceChange:
    """What changed in this node's members of one channel since the last
    write: `joins` (client id -> stored value), `leaves` (client ids), and
    whether this node still has members there (`present`)."""

    joins: dict[str, bytes] = field(default_factory=dict)
    leaves: set[str] = field(default_factory=set)
    present: bool = True

    # A client is in one of `joins` and `leaves` at most, its latest: a
    # writer may apply a change's joins and leaves in either order.

    def join(self, client: str, value: bytes) -> None:
        self.leaves.discard(client)
        self.joins[client] = value

    def leave(self, client: str) -> None:
        """Always a leave, even after a join of the same change: an earlier
        write may have stored the client."""
        self.joins.pop(client, None)
        self.leaves.add(client)

    def merge(self, later: PresenceChange) -> None:
        """Add what changed after this (`later`), whose word is the last."""
        for client in later.leaves:
            self.leave(client)
        for client, value in later.joins.items():
            self.join(client, value)
        self.present = later.present


class PresenceListener(Protocol):
    """What a broker calls on this node's presence (pushd.presence.Presence),
    attached with `Broker.attach_presence`."""

    def members(self) -> dict[str, dict[str, bytes]]:
        """This node's members: channel -> client id -> stored value. What the
        broker writes again when the bus lost them (or this node was taken
        for dead)."""

    def departed(self, channel: str, values: list[bytes]) -> None:
        """Members of `channel` are gone though no leave of theirs was seen:
        their node died (the Redis broker reaped it), or this node's own were
        taken for dead. Stored values (pushd.broker.members)."""

    def arrived(self, channel: str, values: list[bytes]) -> None:
        """Members of this node were written again after the bus had lost
        them (announced as joins: others may have seen them leave)."""


@dataclass(frozen=True)
class ShardState:
    """One Redis server of a broker, for `/health`: what it is (no secret)
    and whether this node is connected to it."""

    name: str
    up: bool
    #: False while this node's shard list differs from the one the nodes
    #: before it wrote there (Redis broker: shard_map.lua).
    same_list: bool = True


class BusListener(Protocol):
    """What a broker calls on this node: everything the bus brings in, and what
    the broker asks of the node. pushd.hub.Hub is the one implementation; the
    hub attaches itself (`Broker.attach`) when it is made."""

    def receive(self, channel: str, payload: bytes) -> None:
        """A bus payload of a subscribed `channel`: pushd's own bus format (after
        pushd.message.BUS_MARKER, one envelope a line) or anything a process
        PUBLISHed. The fan-out hot path; nothing may raise out of it."""

    def resume(self, channel: str) -> None:
        """`channel` is subscribed again after the bus connection was lost:
        messages may be missing since the last one received."""

    def control(self, command: dict[str, Any]) -> int:
        """Carry out an application's command (a JSON object, e.g.
        `{"cmd": "destroy", "channel": "news"}`) on this node's clients;
        answers how many it acted on."""

    def channels(self) -> dict[str, int]:
        """This node's subscribers per channel (channels with none left out)."""

    def count(self, channel: str) -> int:
        """This node's subscribers of `channel`."""

    def bus_error(self, stage: str, channel: str) -> None:
        """Called while the exception is handled when a bus message of
        `channel` raised on its way in at `stage` ("receive", "control"):
        log and count it; the broker goes on with the next message."""


class NoClients:
    """A BusListener with no clients: what a broker nothing attached to has;
    tests subclass it to record what the bus brings."""

    def receive(self, channel: str, payload: bytes) -> None:
        pass

    def resume(self, channel: str) -> None:
        pass

    def control(self, command: dict[str, Any]) -> int:
        return 0

    def channels(self) -> dict[str, int]:
        return {}

    def count(self, channel: str) -> int:
        return 0

    def bus_error(self, stage: str, channel: str) -> None:
        log.failure("a bus message of {channel} failed ({stage})", channel=channel, stage=stage)


#: A listener that takes everything and has no clients.
UNATTACHED: BusListener = NoClients()


class Broker(Service):
    """A twisted Service: started, it connects to its bus; stopped, it lets go."""

    name = "broker"

    def __init__(self) -> None:
        self._in_flight = 0
        self._drained = Waiters()
        self._listener: BusListener = UNATTACHED
        self._presence: PresenceListener | None = None
        #: This process's id among the nodes (16 hex digits): presence
        #: client ids start with it.
        self.node = uuid.uuid4().hex[:16]

    def attach(self, listener: BusListener) -> None:
        """Have `listener` (the hub, once, as it is made) take what the bus
        brings in. Until then the broker delivers to nobody (UNATTACHED)."""
        self._listener = listener

    def attach_presence(self, listener: PresenceListener) -> None:
        """Keep presence for `listener` (this node's, once, before the broker
        starts): without it a broker keeps no presence."""
        self._presence = listener

    @property
    def connected(self) -> bool:
        """False while the bus is unreachable (the memory broker always answers)."""
        return True

    def shards(self) -> list[ShardState]:
        """The Redis servers behind the broker (none for memory)."""
        return []

    def node_stats(self, snapshot: bytes, ttl: float) -> Deferred[list[bytes]]:
        """The admin console's view of the nodes (pushd.admin.stats): write this
        node's `snapshot` (a JSON object of at least one member), which lives
        `ttl` seconds unless written again, and answer every live node's, each
        a JSON object whose `until` (ms) is when it expires; b"" for a node
        that leaves. The memory broker: this node's alone."""
        return succeed([snapshot] if snapshot else [])

    def time_commands(self, histogram: Any) -> None:
        """Observe the seconds each command to a Redis server takes in
        `histogram` (labels `shard`, `command`); the memory broker has none."""

    def track(self, d: Deferred[Any]) -> Deferred[Any]:
        """Count `d` as a command in flight (a publish, a read) until it fires
        (see `drain`)."""
        self._in_flight += 1
        return d.addBoth(self._landed)

    def _landed(self, result: Any) -> Any:
        self._in_flight -= 1
        if not self._in_flight:
            self._drained.fire()
        return result

    def drain(self) -> Deferred[None]:
        """Fires once no command is in flight: a stopping service waits for this."""
        return self._drained.wait(not self._in_flight)

    def abandon(self) -> None:
        """The wait for commands in flight is over (the shutdown timeout ran
        out): each publish still unanswered fails now with OutcomeUnknown, so
        its producer gets a 504 before its connection closes, not silence; a
        read fails with BrokerUnavailable (503). Nothing to do where every
        command is answered at once (memory)."""

    def publish(
        self, channel: str, data: bytes, idempotency_key: str | None = None
    ) -> Deferred[Published]:
        """Store and fan out a message whose `data` is compact JSON.

        Fails with BrokerUnavailable when the message was not stored, and with
        OutcomeUnknown when it may have been (a timeout, a connection lost after
        the command was sent). With an idempotency key seen in the last
        IDEMPOTENCY_TTL seconds it publishes nothing: for the same request
        (channel and data) it answers the first publish's id, for another one it
        fails with IdempotencyKeyReused.
        """
        raise NotImplementedError

    def publish_many(
        self, items: list[tuple[str, bytes]], idempotency_key: str | None = None
    ) -> Deferred[list[Published]]:
        """Publish (channel, data) pairs in order, all or nothing (one script).
        The idempotency key is the batch's, bound to all of its items (and
        never matching a single publish's); failures as `publish`'s."""
        raise NotImplementedError

    def push(
        self, channel: str, entry: bytes, event_list: str, data: bytes
    ) -> Deferred[tuple[bool, Published]]:
        """The nginx+Lua gateway's store and a publish of `data`, atomically:
        `LPUSH <channel> <entry>` and `LPUSH <event_list> <channel>`. The flag is
        False when this broker keeps no lists (it still publishes)."""
        raise NotImplementedError

    def history(self, channel: str, since: str | None, limit: int | None) -> Deferred[History]:
        """With `since`: the retained messages after it (at most `limit`), and
        whether that is all of them (a `since` ahead of the channel's newest id
        is not complete). Without: the newest `limit` messages. Either way
        `last` is the channel's newest id."""
        raise NotImplementedError

    def last_id(self, channel: str) -> Deferred[str | None]:
        raise NotImplementedError

    def subscriber_count(self, channel: str) -> Deferred[int]:
        """Subscribers of `channel` on every node."""
        raise NotImplementedError

    def control(self, command: dict[str, Any]) -> Deferred[int]:
        """Have every node carry out `command` (BusListener.control); fires with
        the number of nodes that did. A `destroy` also drops the channel's history."""
        raise NotImplementedError

    # -- presence (pushd.presence): members kept per channel on every node

    def update_presence(self, changes: dict[str, PresenceChange]) -> Deferred[None]:
        """Write what changed in this node's members (channel -> change).
        Writes reach the bus in the order they are asked for. A failure
        (BrokerUnavailable) loses nothing for good: the broker writes this
        node's members again (`PresenceListener.members`) once it can."""
        raise NotImplementedError

    def presence(self, channel: str, limit: int) -> Deferred[PresenceRead]:
        """The members of `channel` on every live node (at most `limit` values
        listed). BrokerUnavailable when it cannot tell."""
        raise NotImplementedError

    def announce(self, channel: str, payload: bytes) -> Deferred[None]:
        """Hand `payload` (pushd.message.presence_payload) to every node's
        subscribers of `channel`: no history, no id."""
        raise NotImplementedError

    def leave_presence(self) -> Deferred[None]:
        """This node is stopping: its members are gone at once for readers,
        and another node announces their leaves (Redis: it reaps this node)."""
        raise NotImplementedError

    def subscribe(self, channel: str) -> Deferred[None]:
        """Start feeding `channel` to the listener's `receive`; fires once messages will flow.

        Idempotent: the hub calls it when a channel's first local client arrives.
        """
        raise NotImplementedError

    def unsubscribe(self, channel: str) -> None:
        """Stop feeding `channel`; the hub calls it when its last local client left."""
        raise NotImplementedError

    def when_ready(self) -> Deferred[None]:
        """Fires once the broker can publish and subscribe (at once for memory)."""
        raise NotImplementedError

    def subscribed_channels(self) -> frozenset[str]:
        """The channels this process is subscribed to at the bus."""
        raise NotImplementedError

"""The bus and the store behind the hub.

A broker takes publishes (`publish` answers the message id once the message is
stored in the channel's history and on its way to every node), reads history
back for recovery, and feeds the messages of the channels the hub asked for
into the hub's listener. Two implementations share one contract
(tests/test_broker_contract.py): `redis` (many processes, one Redis) and
`memory` (one process, no Redis).

History entries are linked: each remembers the id of the message published
before it on its channel. Reading "everything after <id>" is therefore provably
complete when the first entry read names <id> as its predecessor (or, with
nothing newer, when <id> is the newest entry): whatever trimmed, expired or
lost the history in between breaks the chain, and recovery says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed

#: Called with (channel, raw envelope bytes) for every message of a subscribed channel.
Listener = Callable[[str, bytes], None]
#: The hub's local subscriber counts: all channels, and one channel.
LocalCounts = Callable[[], dict[str, int]]
LocalCount = Callable[[str], int]

IDEMPOTENCY_TTL = 300


def _item_key(key: str | None, index: int) -> str | None:
    return None if key is None else f"{key}#{index}"


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
    #: For a read after an id: True only when no message after it is missing.
    complete: bool = False
    #: The channel's newest retained id when it was read (None: no history).
    #: A subscription's `position`; also tells a `since` ahead of the channel.
    last: str | None = None


class Broker(Service):
    """A twisted Service: started, it connects to its bus; stopped, it lets go."""

    name = "broker"
    listener: Listener | None = None
    #: Called with a channel subscribed again after the bus connection was lost.
    resumed: Callable[[str], None] | None = None
    #: Carries out an application's command on this node; answers how many clients it touched.
    on_control: Callable[[dict[str, Any]], int] | None = None
    local_counts: LocalCounts | None = None
    local_count: LocalCount | None = None

    def __init__(self) -> None:
        self._in_flight = 0
        self._drained: list[Deferred[None]] = []

    @property
    def connected(self) -> bool:
        """False while the bus is unreachable (the memory broker always answers)."""
        return True

    def track(self, d: Deferred[Any]) -> Deferred[Any]:
        """Count `d` as a publish in flight until it fires (see `drain`)."""
        self._in_flight += 1
        return d.addBoth(self._landed)

    def _landed(self, result: Any) -> Any:
        self._in_flight -= 1
        if not self._in_flight and self._drained:
            waiters, self._drained = self._drained, []
            for waiter in waiters:
                waiter.callback(None)
        return result

    def drain(self) -> Deferred[None]:
        """Fires once no publish is in flight: a stopping service waits for this."""
        if not self._in_flight:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d

    def publish(
        self, channel: str, data: bytes, idempotency_key: str | None = None
    ) -> Deferred[Published]:
        """Store and fan out a message whose `data` is compact JSON.

        Fails with BrokerUnavailable when the message could not be accepted.
        With an idempotency key seen in the last IDEMPOTENCY_TTL seconds it
        publishes nothing and answers the first publish's id.
        """
        raise NotImplementedError

    def publish_many(
        self, items: list[tuple[str, bytes]], idempotency_key: str | None = None
    ) -> Deferred[list[Published]]:
        """Publish (channel, data) pairs in order, pipelined; each item is
        idempotent on its own (`<key>#<index>`). Fails with BrokerUnavailable."""
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
        whether that is all of them. Without: the newest `limit` messages."""
        raise NotImplementedError

    def last_id(self, channel: str) -> Deferred[str | None]:
        raise NotImplementedError

    def subscriber_count(self, channel: str) -> Deferred[int]:
        """Subscribers of `channel` on every node."""
        raise NotImplementedError

    def control(self, command: dict[str, Any]) -> Deferred[int]:
        """Have every node carry out `command` (pushd.hub.Hub.control); fires with
        the number of nodes that did. A `destroy` also drops the channel's history."""
        raise NotImplementedError

    def subscribe(self, channel: str) -> Deferred[None]:
        """Start feeding `channel` to the listener; fires once messages will flow.

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

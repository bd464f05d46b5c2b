"""The bus and the store behind the hub.

A broker takes publishes (`publish` answers the message id once the message is
stored and on its way to every node) and feeds the messages of the channels the
hub asked for into the hub's listener. Two implementations share one contract
(tests/test_broker_contract.py): `redis` (many processes, one Redis) and
`memory` (one process, no Redis).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred

#: Called with (channel, raw envelope bytes) for every message of a subscribed channel.
Listener = Callable[[str, bytes], None]


class BrokerUnavailable(Exception):
    """The broker cannot take a publish now; nothing was stored (HTTP 503)."""


class Broker(Service):
    """A twisted Service: started, it connects to its bus; stopped, it lets go."""

    name = "broker"
    listener: Listener | None = None

    def publish(self, channel: str, data: bytes) -> Deferred[str]:
        """Store and fan out a message whose `data` is compact JSON; fires with its id.

        Fails with BrokerUnavailable when the message could not be accepted.
        """
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

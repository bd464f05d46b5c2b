"""One client's subscriptions, whatever carries them (WebSocket, SSE, stream).

Subscribing with `since` follows the safe order: join the channel live first
and buffer what arrives, read the history after `since`, send it, then release
the buffered live messages newer than the last one sent. So a client gets every
retained message once, in id order, even while producers publish; and
"recovered" is true only when the history proves nothing after `since` is gone.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from pushd.broker import Broker, BrokerUnavailable, History
from pushd.hub import Hub
from pushd.message import Burst, Delivery, Message, envelope, parse_id

log = Logger()


class Outlet(Protocol):
    """What a transport does with the events of its session."""

    #: True while history is replayed: a transport does not count those bytes
    #: against its slow-consumer bound (the history bounds them), or a client
    #: far behind could never catch up.
    replaying: bool

    def subscribed(self, channel: str, recovered: bool) -> None: ...

    def message(self, message: Delivery) -> None:
        """A message, or a Burst of them: a live one is the same object for
        every local subscriber."""

    def unsubscribed(self, channel: str) -> None:
        """The application took the client out of `channel` (streams end)."""

    def disconnect(self) -> None:
        """The application disconnects the client (WebSocket close code 4003)."""


class AlreadySubscribed(Exception):
    pass


class Session:
    __slots__ = ("_broker", "_hub", "_out", "_subs", "user")

    def __init__(self, hub: Hub, broker: Broker, out: Outlet) -> None:
        self._hub = hub
        self._broker = broker
        self._out = out
        #: The token's `sub`, once `identify` made the session the user's.
        self.user: str | None = None
        # channel -> the list buffering its live messages until the subscription
        # is acknowledged (and recovered); then the id of the last message
        # replayed, until a newer one comes live; then None.
        self._subs: dict[str, list[Message] | tuple[int, int] | None] = {}

    def __contains__(self, channel: str) -> bool:
        return channel in self._subs

    def __len__(self) -> int:
        return len(self._subs)

    def subscribe(self, channel: str, since: str | None = None) -> Deferred[None]:
        """Join `channel`; the outlet hears `subscribed`, then (with `since`) the
        history after it, then live messages. Raises AlreadySubscribed."""
        if channel in self._subs:
            raise AlreadySubscribed(channel)
        pending: list[Message] = []
        self._subs[channel] = pending
        d = Deferred.fromCoroutine(self._join(channel, since, pending))
        d.addErrback(lambda f: log.failure("subscribing {channel} failed", f, channel=channel))
        return d

    async def _join(self, channel: str, since: str | None, pending: list[Message]) -> None:
        await self._hub.subscribe(channel, self)
        history = History()
        if since is not None and self._subs.get(channel) is pending:
            # Without Redis the subscription goes on live, with recovered false.
            with suppress(BrokerUnavailable):
                history = await self._broker.history(channel, since, None)
        if self._subs.get(channel) is not pending:
            return  # unsubscribed or closed meanwhile
        out = self._out
        out.subscribed(channel, history.complete)
        if since is None:
            self._live(channel)
        else:
            last = parse_id(since)
            replay = [
                Message(channel, msg_id, envelope(channel, msg_id, data))
                for msg_id, data in history.messages
            ]
            if replay:
                last = parse_id(replay[-1].id)  # type: ignore[arg-type]
                out.replaying = True
                try:
                    out.message(replay[0] if len(replay) == 1 else Burst(replay))
                finally:
                    out.replaying = False
            # Pub/sub runs on another connection than the history read: messages
            # just replayed may still arrive live. Drop them until a newer one.
            self._subs[channel] = last
        for message in pending:
            self.deliver(message)

    def _live(self, channel: str) -> None:
        """Nothing more to hold back or drop: the transport takes `channel` straight."""
        self._subs[channel] = None
        self._hub.deliver_directly(channel, self, self._out.message)

    def identify(self, user: str, personal_channel: str | None) -> None:
        """The client is `user`: the application may address it, and it joins the
        user's personal channel without asking."""
        self.user = user
        self._hub.add_user(user, self)
        if personal_channel is not None and personal_channel not in self._subs:
            self.subscribe(personal_channel)

    def unsubscribe(self, channel: str, *, tell: bool = False) -> bool:
        """Leave `channel`; False when the session was not in it. `tell`: the
        outlet hears of it (the application's doing, not the client's)."""
        if channel not in self._subs:
            return False
        del self._subs[channel]
        self._hub.unsubscribe(channel, self)
        if tell:
            self._out.unsubscribed(channel)
        return True

    def disconnect(self) -> None:
        self._out.disconnect()

    def close(self) -> None:
        """Leave every channel: nothing of this client stays in the hub."""
        subs, self._subs = self._subs, {}
        for channel in subs:
            self._hub.unsubscribe(channel, self)
        if self.user is not None:
            self._hub.remove_user(self.user, self)
            self.user = None

    def deliver(self, message: Delivery) -> None:
        """The hub's entry point for live messages."""
        try:
            state = self._subs[message.channel]
        except KeyError:
            return
        if state is None:
            self._out.message(message)
            return
        for one in message.messages:
            if one.channel not in self._subs:
                return  # the client left meanwhile (or was dropped)
            state = self._subs[one.channel]
            if state is None:
                self._out.message(one)
            elif isinstance(state, list):
                state.append(one)
            elif one.id is None:
                self._out.message(one)
            elif parse_id(one.id) > state:
                self._live(one.channel)
                self._out.message(one)

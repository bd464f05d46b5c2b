"""One client's subscriptions, whatever carries them (WebSocket, SSE, stream).

Every subscription follows the safe order: join the channel live first and
buffer what arrives, make ONE read of the broker (the history after `since`,
or, without `since`, the channel's newest id), acknowledge, send the history,
then release the buffered live messages newer than the read. So a client gets
every retained message once, in id order, even while producers publish; and
"recovered" is true only when the history proves nothing after `since` is gone.

Position. The acknowledgement carries `position`: the newest id the read saw
(None: the channel had no history). The read is the subscription's cut: every
message of the channel after `position` reaches the client (replayed or live),
and no message at or before it is sent once the acknowledgement is: the session
drops live messages up to `position` (or up to the last one replayed, which is
the same id). So `position` is a safe resume point for a client that has had
nothing else on the channel, and a client's id-based dedup never throws away a
message sent after it.

The race, on Redis: pub/sub and the read run on two connections, so a message
published between the join and the read reaches pushd live, maybe while the
read is in flight (it waits in the buffer), maybe only after the read's answer
(it comes straight to `deliver`). Either way its id says on which side of the
cut it is: newer than `position`, it is delivered (from the buffer, in order,
after the replay; or live); at or before `position`, it was in the channel
before the subscription took effect, and is not sent (a replay has already
sent it when it comes after `since`). Nothing newer than `position` is ever
dropped. Messages without an id (PUBLISHed into Redis by another process) are
always delivered and never move the cut.

`since` ahead of the channel (clock skew, an id from elsewhere) answers
recovered false and `position` the real newest id: live messages after it flow.

Presence (pushd.presence): on a channel that has it, the session joins as a
member (its `client` id, the token's sub and info) once live and before the
read, so `subscribed` comes after the member is stored; it leaves when it
unsubscribes or closes.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from pushd.broker import BrokerUnavailable, History
from pushd.hub import Hub
from pushd.message import Delivery, Message, parse_id
from pushd.presence import Presence
from pushd.reads import Replay

log = Logger()


class Outlet(Protocol):
    """What a transport does with the events of its session."""

    #: True while history is replayed: a transport does not count those bytes
    #: against its slow-consumer bound (the history bounds them), or a client
    #: far behind could never catch up.
    replaying: bool

    def subscribed(self, channel: str, recovered: bool, position: str | None) -> None:
        """The subscription is acknowledged: sent before any message of `channel`."""

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
    __slots__ = ("_acks", "_hub", "_member", "_out", "_presence", "_subs", "client", "user")

    def __init__(self, hub: Hub, out: Outlet, presence: Presence | None = None) -> None:
        self._hub = hub
        self._out = out
        self._presence = presence
        #: The token's `sub`, once `identify` made the session the user's.
        self.user: str | None = None
        #: The connection's id among the nodes, once a presence channel needs it.
        self.client: str | None = None
        # What a presence member shows of the client: the token's sub and info.
        self._member: tuple[str | None, bytes] = (None, b"null")
        # channel -> the list buffering its live messages until the subscription
        # is acknowledged (and recovered); then the id of the last message
        # replayed, until a newer one comes live; then None.
        self._subs: dict[str, list[Message] | tuple[int, int] | None] = {}
        # channel -> (its subscription's buffer, what waits for its
        # acknowledgement: `acknowledged`); None while nothing waits.
        self._acks: dict[str, tuple[list[Message], Deferred[None]]] | None = None

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

    def acknowledged(self, channel: str, within: float, clock: Any) -> Deferred[None] | None:
        """Fires once the subscription to `channel` under way is acknowledged
        (or gone), or `within` seconds (on `clock`) after the first ask about
        it, whichever comes first; None when none is under way. The client's
        own publish waits for it: its subscription's read would otherwise see
        the message and cut it (pushd.reads sends the read at the end of the
        turn); a broker that cannot complete the subscription holds it for
        `within` at most, however many publishes wait."""
        pending = self._subs.get(channel)
        if not isinstance(pending, list):
            return None
        if self._acks is None:
            self._acks = {}
        entry = self._acks.get(channel)
        if entry is None or entry[0] is not pending:
            done: Deferred[None] = Deferred()
            done.addTimeout(within, clock).addErrback(lambda _: None)
            entry = self._acks[channel] = (pending, done)
        waiter: Deferred[None] = Deferred()
        entry[1].addBoth(_release, waiter)
        return waiter

    def _acknowledge(self, channel: str, pending: list[Message]) -> None:
        acks = self._acks
        entry = acks.get(channel) if acks is not None else None
        if acks is None or entry is None or entry[0] is not pending:
            return
        del acks[channel]
        if not acks:
            self._acks = None
        if not entry[1].called:  # else: its time ran out
            entry[1].callback(None)

    def present_as(self, user: str | None, info: bytes) -> None:
        """What the client's presence members show (its token's `sub` and
        `info`, compact JSON); set before the first subscription."""
        self._member = (user, info)

    async def _join(self, channel: str, since: str | None, pending: list[Message]) -> None:
        try:
            await self._joined(channel, since, pending)
        finally:
            self._acknowledge(channel, pending)

    async def _joined(self, channel: str, since: str | None, pending: list[Message]) -> None:
        await self._hub.subscribe(channel, self)
        presence = self._presence
        if presence is not None and self._subs.get(channel) is pending and presence.tracks(channel):
            # Stored before `subscribed`: a query right after it finds the client.
            if self.client is None:
                self.client = presence.new_client()
            await presence.join(channel, self.client, *self._member)
        # Joined live: from here on `pending` holds what arrives. One read now
        # (shared with the sessions that ask the same in this turn).
        replay = _NOTHING
        if self._subs.get(channel) is pending:
            # Without Redis, or when the read fails in any other way, the
            # subscription goes on live, with recovered false and no position:
            # never a buffer nobody acknowledges.
            try:
                replay = await self._hub.read(channel, since)
            except BrokerUnavailable:
                pass
            except Exception:
                log.failure("reading {channel} for a subscription failed", channel=channel)
        if self._subs.get(channel) is not pending:
            return  # unsubscribed or closed meanwhile
        out = self._out
        history = replay.history
        position = _position(since, history.last, replay.messages)
        out.subscribed(channel, history.complete, position)
        if replay.delivery is not None:
            out.replaying = True
            try:
                out.message(replay.delivery)
            finally:
                out.replaying = False
        if position is None:
            self._live(channel)
        else:
            # The cut (see the module's docstring): live messages up to `position`
            # were replayed, or came before the subscription.
            self._subs[channel] = parse_id(position)
        for message in pending:
            self.deliver(message)

    def _live(self, channel: str) -> None:
        """Nothing more to hold back or drop: the transport takes `channel` straight."""
        self._subs[channel] = None
        self._hub.deliver_directly(channel, self, self._out.message)

    def identify(self, user: str, personal_channel: str | None) -> Deferred[None]:
        """The client is `user`: the application may address it, and it joins the
        user's personal channel without asking (fires once that is live)."""
        self.user = user
        self._hub.add_user(user, self)
        if personal_channel is not None and personal_channel not in self._subs:
            return self.subscribe(personal_channel)
        return succeed(None)

    def unsubscribe(self, channel: str, *, tell: bool = False) -> bool:
        """Leave `channel`; False when the session was not in it. `tell`: the
        outlet hears of it (the application's doing, not the client's)."""
        if channel not in self._subs:
            return False
        del self._subs[channel]
        self._hub.unsubscribe(channel, self)
        if self.client is not None and self._presence is not None:
            self._presence.leave(channel, self.client)
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
            if self.client is not None and self._presence is not None:
                self._presence.leave(channel, self.client)
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


_NOTHING = Replay("", History())


def _release(result: object, waiter: Deferred[None]) -> object:
    waiter.callback(None)
    return result


def _position(since: str | None, last: str | None, replay: list[Message]) -> str | None:
    """Where the subscription starts (see the module's docstring): the newest id
    the read saw; with `since`, the last message replayed, or `since` itself when
    the channel has nothing newer, or the channel's newest id when `since` is
    ahead of it. Never past what the client is sent: the session drops live
    messages up to it."""
    if since is None:
        return last
    if replay:
        return replay[-1].id
    if last is None:
        return None
    return last if parse_id(last) < parse_id(since) else since

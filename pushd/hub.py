"""The local fan-out: which connection of this process listens to which channel.

The hub asks the broker for a channel when its first local subscriber arrives
and lets it go when the last one leaves. Each message reaches the hub once and
is handed, as one Message object (its envelope serialised once, its frame made
once), to every local subscriber. Nothing here knows about sockets.

Messages are handed out from the end of the reactor turn they arrived in, a
walk over the channel's subscribers, FANOUT_CHUNK deliveries a reactor turn:
between chunks the reactor reads its sockets, and messages that came meanwhile
join what the subscribers not yet reached get. So each subscriber is handed,
as one Burst (one send), every message of the channel it has not had yet:
those that came together (one read of the bus, one batch), and, while a large
fan-out is being written, those that came during it. A busy node writes fewer,
larger frames per connection instead of falling behind (the subscribers
already passed get the newcomers in the next walk, in order). Each subscriber
keeps how far it got (`_Receiver.next`, an index into the channel's `log`).

The hub remembers the last id it handed out per channel. When the broker's bus
connection comes back after an outage, the hub fills the gap from the history
before live messages go on (and drops live messages it already handed out), so
connected clients see a delay, not a hole. Only ids pushd produced count: a
payload another process PUBLISHed is data with no id (pushd.message, BUS_MARKER)
and moves nothing.

A message's path, one name a step: the broker's bus connection receives a
payload (`RedisBroker._bus_received`; the memory broker's publish makes it)
and hands it to the BusListener attached to the broker (pushd.broker), that
is `Hub.receive`; `Message.from_bus` makes messages of it; `Hub._take` appends
each to the channel's log (or holds it back while a gap is filled); `Hub.flush`
walks the subscribers and hands each what it has not had to its `deliver`. `receive` and every
`deliver` call sit behind an exception boundary: what raises is logged with
its channel and counted (`pushd_bus_errors_total`, `pushd_delivery_errors_total`),
and the other messages and subscribers go on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from pushd.broker import Broker, BrokerUnavailable
from pushd.message import (
    Burst,
    Delivery,
    Message,
    PresenceEvent,
    format_id,
    is_channel,
    parse_id,
)
from pushd.reads import Replay, SharedReads

log = Logger()

#: Deliveries one reactor turn makes at most, before it reads its sockets again.
FANOUT_CHUNK = 1000


def _ignore(n: int) -> None:
    pass


def _never(channel: str) -> bool:
    return False


class Subscriber(Protocol):
    def deliver(self, message: Delivery) -> None:
        """Take a message (or a Burst of them) of a channel this subscriber is in.
        Must not block."""

    def unsubscribe(self, channel: str, *, tell: bool = False) -> bool:
        """Leave `channel` (the application destroyed it); `tell` the client."""


class _Receiver:
    """A subscriber of a channel as the hub walks them: what takes its
    deliveries (None once it left) and the index of the first message of the
    channel's log it has not been handed."""

    __slots__ = ("deliver", "next")

    def __init__(self, deliver: Callable[[Delivery], None], next: int) -> None:
        self.deliver: Callable[[Delivery], None] | None = deliver
        self.next = next


class _Channel:
    __slots__ = ("base", "buffer", "last", "log", "made", "subscribers", "walk", "walked")

    def __init__(self) -> None:
        # Each subscriber, with what the hub calls to hand it a delivery: its
        # `deliver`, or what it named with `deliver_directly`.
        self.subscribers: dict[Subscriber, _Receiver] = {}
        self.last: tuple[int, int] | None = None
        # Live messages held back while the gap after an outage is filled.
        self.buffer: list[Message] | None = None
        # Messages not yet handed to every subscriber; log[i] is message base + i.
        self.log: list[Message] = []
        self.base = 0
        # The walk under way: the receivers when it began, and how far it got.
        self.walk: list[_Receiver] | None = None
        self.walked = 0
        # The deliveries made for the current end of the log, by starting
        # point: one Burst (one frame) for all the subscribers that share it,
        # whichever chunk reaches them.
        self.made: tuple[int, dict[int, Delivery]] = (0, {})

    @property
    def end(self) -> int:
        """The index the next message will have."""
        return self.base + len(self.log)


class Hub:
    def __init__(
        self,
        broker: Broker,
        metrics: Any = None,
        *,
        clock: Any = None,
        announced: Callable[[str], bool] | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock = clock
        self._due: list[_Channel] = []
        self._flush_call: Any = None
        self._broker = broker
        #: Whether this node's subscribers of a channel hear joins and leaves
        #: (pushd.presence, --join-leave): on another channel, a payload in
        #: the presence events' format is data like any other.
        self._announced = announced or _never
        self._delivered = metrics.deliveries.inc if metrics is not None else _ignore
        self._metrics = metrics
        self._channels: dict[str, _Channel] = {}
        self._users: dict[str, set[Any]] = {}
        #: Messages handed out per channel since the admin console last took
        #: them (pushd.admin.stats); None, and not counted, while it is off.
        self.rates: dict[str, int] | None = None
        self._reads = SharedReads(broker, clock, metrics)
        broker.attach(self)

    def stop(self) -> None:
        """The node stops: what is waiting to be logged is logged now."""
        self._reads.flush()

    def subscribe(self, channel: str, subscriber: Subscriber) -> Deferred[None]:
        """Add `subscriber` to `channel`; fires once the broker feeds the channel.

        No message of the channel can reach the subscriber before that.
        """
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel()
        old = state.subscribers.get(subscriber)
        if old is None:
            state.subscribers[subscriber] = _Receiver(subscriber.deliver, state.end)
        return self._broker.subscribe(channel)

    def read(self, channel: str, since: str | None) -> Deferred[Replay]:
        """A subscriber's read, after it joined `channel`: the history after
        `since` (None: the newest id only), shared with the subscribers that
        ask the same in this turn (pushd.reads)."""
        return self._reads.read(channel, since)

    def unsubscribe(self, channel: str, subscriber: Subscriber) -> None:
        state = self._channels.get(channel)
        if state is None:
            return
        receiver = state.subscribers.pop(subscriber, None)
        if receiver is not None:
            receiver.deliver = None  # a walk under way passes it by
        if not state.subscribers:
            del self._channels[channel]
            self._broker.unsubscribe(channel)

    def deliver_directly(
        self, channel: str, subscriber: Subscriber, deliver: Callable[[Delivery], None]
    ) -> None:
        """From now on `deliver`, not `subscriber.deliver`, takes `channel`'s
        messages: a session whose subscription is plainly live hands the hub its
        transport's own method, one call less per delivery."""
        state = self._channels.get(channel)
        receiver = state.subscribers.get(subscriber) if state is not None else None
        if receiver is not None:
            receiver.deliver = deliver

    def receive(self, channel: str, payload: bytes) -> None:
        """BusListener.receive: a bus payload of `channel` in, its messages
        queued for this turn's flush. Nothing raised here reaches the broker."""
        state = self._channels.get(channel)
        if state is None:
            return
        try:
            messages = Message.from_bus(channel, payload)
            first = messages[0]
            if isinstance(first, PresenceEvent) and not self._announced(channel):
                messages = [first := Message.foreign(channel, payload)]
            # Foreign data: no id, and not a presence event (a Message subclass).
            if first.id is None and type(first) is Message and self._metrics is not None:
                self._metrics.bus_foreign.inc()
        except Exception:
            self.bus_error("parse", channel)
            return
        for message in messages:
            try:
                self._take(state, message)
            except Exception:
                self.bus_error("take", channel)

    def bus_error(self, stage: str, channel: str) -> None:
        """Log the exception being handled, raised at `stage` of a bus message
        of `channel`, and count it; the caller goes on with the next message."""
        log.failure("a bus message of {channel} failed ({stage})", channel=channel, stage=stage)
        if self._metrics is not None:
            self._metrics.bus_errors.labels(stage=stage).inc()

    def _take(self, state: _Channel, message: Message) -> None:
        if message.id is not None:
            if state.buffer is not None:
                state.buffer.append(message)
                return
            key = parse_id(message.id)
            if state.last is not None and key <= state.last:
                return  # already handed out while filling a gap
            state.last = key
        if self.rates is not None:
            self.rates[message.channel] = self.rates.get(message.channel, 0) + 1
        if not state.log:
            self._due.append(state)
            if self._flush_call is None:
                self._flush_call = self._clock.callLater(0, self.flush)
        state.log.append(message)

    def flush(self) -> None:
        """Walk the subscribers of the channels with messages (the reactor
        calls it at the end of the turn they came in), FANOUT_CHUNK deliveries
        at most; the rest in the next turns."""
        self._flush_call = None
        budget = FANOUT_CHUNK
        due, self._due = self._due, []
        for index, state in enumerate(due):
            if budget <= 0:
                self._due[:0] = due[index:]
                break
            try:
                budget -= self._walk(state, budget)
            except Exception:
                state.walk = None
                self._delivery_failed(state.log[0].channel if state.log else "?")
            if state.log and state.subscribers:
                self._due.append(state)
            else:
                state.log, state.base, state.walk = [], state.end, None
        if self._due and self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self.flush)

    def _walk(self, state: _Channel, budget: int) -> int:
        """Hand up to `budget` subscribers of `state` what they have not had;
        how many were handed something."""
        walk = state.walk
        if walk is None:
            walk = state.walk = list(state.subscribers.values())
            state.walked = 0
        log, base = state.log, state.base
        end = base + len(log)
        made_for, made = state.made
        if made_for != end:
            made = {}
            state.made = (end, made)
        handed = messages = 0
        position, stop = state.walked, min(len(walk), state.walked + budget)
        while position < stop:
            receiver = walk[position]
            position += 1
            first, deliver = receiver.next, receiver.deliver
            if deliver is None or first >= end:
                continue
            delivery = made.get(first)
            if delivery is None:
                batch = log[first - base :]
                delivery = made[first] = batch[0] if len(batch) == 1 else Burst(batch)
            receiver.next = end
            handed += 1
            messages += end - first
            try:
                deliver(delivery)
            except Exception:
                self._delivery_failed(log[0].channel)
        state.walked = position
        self._delivered(messages)
        if position >= len(walk):
            # Walked: what every subscriber has had leaves the log; those
            # passed before the last messages came get them in the next walk.
            state.walk = None
            low = min((r.next for r in state.subscribers.values()), default=end)
            del log[: low - base]
            state.base = low
            state.made = (0, {})
        return max(handed, 1)

    def _delivery_failed(self, channel: str) -> None:
        """A subscriber raised taking a delivery: logged, counted; the others go on."""
        log.failure("delivering a message of {channel} failed", channel=channel)
        if self._metrics is not None:
            self._metrics.delivery_errors.inc()

    def resume(self, channel: str) -> None:
        """The broker subscribed `channel` again after losing its bus connection."""
        state = self._channels.get(channel)
        if state is None or state.last is None or state.buffer is not None:
            return
        state.buffer = []
        Deferred.fromCoroutine(self._fill_gap(channel, state)).addErrback(
            lambda f: log.failure("filling the gap of {channel} failed", f, channel=channel)
        )

    async def _fill_gap(self, channel: str, state: _Channel) -> None:
        assert state.last is not None
        since = format_id(*state.last)
        try:
            history = await self._broker.history(channel, since, None)
        except BrokerUnavailable:
            history = None
        buffered, state.buffer = state.buffer or [], None
        if self._channels.get(channel) is not state:
            return
        if history is not None:
            if not history.complete:
                log.warn(
                    "messages of {channel} after {since} are gone", channel=channel, since=since
                )
            for msg_id, data in history.messages:
                self._take(state, Message.stored(channel, msg_id, data))
        for message in buffered:
            self._take(state, message)

    # -- the application's commands (pushd.broker delivers them to every node)

    def add_user(self, user: str, session: Any) -> None:
        self._users.setdefault(user, set()).add(session)

    def remove_user(self, user: str, session: Any) -> None:
        sessions = self._users.get(user)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._users[user]

    def control(self, command: dict[str, Any]) -> int:
        """Carry out a command on this node's clients; how many it acted on."""
        kind, user, channel = command.get("cmd"), command.get("user"), command.get("channel")
        if channel is not None and not (isinstance(channel, str) and is_channel(channel)):
            log.warn("control command with a bad channel: {command!r}", command=command)
            return 0
        if kind == "destroy" and isinstance(channel, str):
            state = self._channels.get(channel)
            targets = tuple(state.subscribers) if state is not None else ()
            return sum(s.unsubscribe(channel, tell=True) for s in targets)
        sessions = tuple(self._users.get(user, ())) if isinstance(user, str) else ()
        if kind == "subscribe" and isinstance(channel, str):
            joining = [s for s in sessions if channel not in s]
            for session in joining:
                session.subscribe(channel)
            return len(joining)
        if kind == "unsubscribe" and isinstance(channel, str):
            return sum(s.unsubscribe(channel, tell=True) for s in sessions)
        if kind == "disconnect":
            for session in sessions:
                session.disconnect()
            return len(sessions)
        log.warn("unknown control command {command!r}", command=command)
        return 0

    def users(self) -> dict[str, int]:
        """Local sessions per user."""
        return {user: len(sessions) for user, sessions in self._users.items()}

    def count(self, channel: str) -> int:
        state = self._channels.get(channel)
        return len(state.subscribers) if state is not None else 0

    def channels(self) -> dict[str, int]:
        """Local subscriber count per channel."""
        return {channel: len(state.subscribers) for channel, state in self._channels.items()}

"""The Session's positions, deterministically: the memory broker and the hub on a
`task.Clock`, reads of the broker held open and bus deliveries held back, so
each interleaving of the race a real Redis allows is played on purpose.

The invariant every test checks (pushd.session): once `subscribed` says
`position`, the client is sent every message of the channel after it, once,
in id order, and none at or before it; so `position` is a safe resume point.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent

from pushd.broker import BrokerUnavailable, BusListener, History
from pushd.broker.memory import MemoryBroker
from pushd.hub import Hub
from pushd.message import Burst, Message, envelope, parse_id
from pushd.metrics import Metrics
from pushd.session import AlreadySubscribed, Session


class Outlet:
    """Records what a transport would send: ("subscribed", recovered, position)
    and ("message", id) per channel, in order."""

    replaying = False

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.replayed: list[str | None] = []

    def subscribed(self, channel: str, recovered: bool, position: str | None) -> None:
        self.events.append(("subscribed", channel, recovered, position))

    def message(self, message: Any) -> None:
        for one in message.messages if isinstance(message, Burst) else (message,):
            self.events.append(("message", one.channel, one.id))
            if self.replaying:
                self.replayed.append(one.id)

    def unsubscribed(self, channel: str) -> None:
        self.events.append(("unsubscribed", channel))

    def disconnect(self) -> None:
        self.events.append(("disconnect",))

    def ack(self, channel: str) -> tuple[bool, str | None]:
        acks = [e for e in self.events if e[0] == "subscribed" and e[1] == channel]
        assert len(acks) == 1, self.events
        return acks[0][2], acks[0][3]

    def ids(self, channel: str) -> list[str | None]:
        return [e[2] for e in self.events if e[0] == "message" and e[1] == channel]


class _HeldBus:
    """The hub as HeldBroker's listener: its bus payloads kept back while the
    broker's `hold_bus` is set; the rest of BusListener goes to the hub as is."""

    def __init__(self, broker: HeldBroker, hub: BusListener) -> None:
        self._broker = broker
        self._hub = hub

    def receive(self, channel: str, payload: bytes) -> None:
        if self._broker.hold_bus:
            self._broker._bus.append((channel, payload))
        else:
            self._hub.receive(channel, payload)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hub, name)


class HeldBroker(MemoryBroker):
    """The memory broker, with two knobs for the race: `hold_reads` keeps the
    session's read (last_id / history) open until `answer_reads()` (which reads
    the store then: the moment of the read's snapshot), and `hold_bus` keeps
    messages off the bus until `release_bus()` (pub/sub late, on its own
    connection)."""

    def __init__(self, clock: Clock, history_size: int = 100) -> None:
        super().__init__(clock, history_size=history_size, history_ttl=3600)
        self.hold_reads = False
        self.hold_bus = False
        self._reads: list[tuple[Deferred[Any], Any]] = []
        self._bus: list[tuple[str, bytes]] = []

    def attach(self, listener: BusListener) -> None:
        # The hub attaches itself on creation: it gets the bus through _HeldBus.
        self._hub = listener
        super().attach(_HeldBus(self, listener))

    def release_bus(self) -> None:
        self.hold_bus = False
        bus, self._bus = self._bus, []
        for channel, raw in bus:
            self._hub.receive(channel, raw)

    def _held(self, read: Any) -> Deferred[Any]:
        if not self.hold_reads:
            return read()  # type: ignore[no-any-return]
        d: Deferred[Any] = Deferred()
        self._reads.append((d, read))
        return d

    def last_id(self, channel: str) -> Deferred[str | None]:
        return self._held(lambda: MemoryBroker.last_id(self, channel))

    def history(self, channel: str, since: str | None, limit: int | None) -> Deferred[History]:
        return self._held(lambda: MemoryBroker.history(self, channel, since, limit))

    def answer_reads(self) -> None:
        self.hold_reads = False
        reads, self._reads = self._reads, []
        for d, read in reads:
            read().chainDeferred(d)


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(1_700_000_000)  # ids of today's form, never "0-0"
    return c


@pytest.fixture
def broker(clock: Clock) -> HeldBroker:
    return HeldBroker(clock)


@pytest.fixture
def hub(broker: HeldBroker, clock: Clock) -> Hub:
    return Hub(broker, clock=clock)


def publish(broker: HeldBroker, clock: Clock, channel: str, n: int) -> str:
    msg_id = broker.publish(channel, str(n).encode()).result.id
    clock.advance(0)  # the hub hands messages out at the end of the turn
    return msg_id


def assert_safe(out: Outlet, channel: str, all_ids: list[str], since: str | None = None) -> None:
    """Every message after the position, once, in order; none at or before it
    (a replay after `since` comes first, then the same rule for live ones)."""
    _, position = out.ack(channel)
    start = parse_id(position) if position is not None else (-1, -1)
    got = [i for i in out.ids(channel) if i is not None]
    replayed = [i for i in out.replayed if i is not None]
    if since is not None:
        assert replayed == got[: len(replayed)]
        assert all(parse_id(i) > parse_id(since) for i in replayed)
        if replayed:
            assert replayed[-1] == position
    live = got[len(replayed) :]
    assert live == [i for i in all_ids if parse_id(i) > start], (position, out.events)


def test_a_quiet_channel_has_no_position_and_goes_live(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    out = Outlet()
    Session(hub, out).subscribe("quiet")
    clock.advance(0)
    assert out.events == [("subscribed", "quiet", False, None)]
    first = publish(broker, clock, "quiet", 1)
    assert out.ids("quiet") == [first]


def test_with_history_the_position_is_the_newest_id(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    old = [publish(broker, clock, "news", n) for n in range(3)]
    out = Outlet()
    Session(hub, out).subscribe("news")
    clock.advance(0)
    assert out.events == [("subscribed", "news", False, old[-1])]
    new = publish(broker, clock, "news", 3)
    assert out.ids("news") == [new]


def test_a_message_during_the_read_is_delivered(broker: HeldBroker, hub: Hub, clock: Clock) -> None:
    """Published after the read's snapshot but arriving while it is in flight
    (buffered), and published after it arriving after its answer: both come."""
    old = publish(broker, clock, "news", 0)
    # The read ran on Redis (its snapshot is taken); its answer is on its way
    # while a message arrives live.
    snapshot = broker.last_id("news").result
    out = Outlet()
    broker.hold_reads = True
    Session(hub, out).subscribe("news")
    clock.advance(0)
    during = publish(broker, clock, "news", 1)
    assert out.events == []  # nothing before the acknowledgement
    d, _ = broker._reads.pop()
    d.callback(snapshot)
    assert out.ack("news") == (False, old)
    after = publish(broker, clock, "news", 2)
    assert out.ids("news") == [during, after]
    assert_safe(out, "news", [old, during, after])


def test_a_message_the_read_saw_but_the_bus_brings_later_is_not_sent_twice(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    """Redis: pub/sub is another connection than the read. A message stored
    before the read may reach pushd live after the read's answer: it is at or
    before the position, so it is not sent (a client would take it for one it
    had, or resume past it); the next one is."""
    publish(broker, clock, "news", 0)
    out = Outlet()
    broker.hold_reads = True
    Session(hub, out).subscribe("news")
    clock.advance(0)
    broker.hold_bus = True
    raced = publish(broker, clock, "news", 1)  # stored; its pub/sub still on the way
    broker.answer_reads()  # the snapshot sees it
    assert out.ack("news") == (False, raced)
    broker.release_bus()
    clock.advance(0)
    assert out.ids("news") == []
    after = publish(broker, clock, "news", 2)
    assert out.ids("news") == [after]
    assert_safe(out, "news", [raced, after])


def test_since_ahead_of_the_channel_is_not_recovered_and_live_messages_flow(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    newest = publish(broker, clock, "news", 0)
    ms, _ = parse_id(newest)
    ahead = f"{ms + 3_600_000}-0"  # an hour of clock skew
    out = Outlet()
    Session(hub, out).subscribe("news", ahead)
    clock.advance(0)
    assert out.ack("news") == (False, newest)
    live = [publish(broker, clock, "news", n) for n in (1, 2)]
    assert out.ids("news") == live
    # On a channel without history: no position, everything live.
    out2 = Outlet()
    Session(hub, out2).subscribe("empty", ahead)
    clock.advance(0)
    assert out2.ack("empty") == (False, None)
    msg = publish(broker, clock, "empty", 1)
    assert out2.ids("empty") == [msg]


def test_since_the_beginning_replays_everything_retained(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    ids = [publish(broker, clock, "news", n) for n in range(4)]
    out = Outlet()
    Session(hub, out).subscribe("news", "0-0")
    clock.advance(0)
    recovered, position = out.ack("news")
    assert position == ids[-1]
    assert out.replayed == ids
    live = publish(broker, clock, "news", 4)
    assert out.ids("news") == [*ids, live]
    assert_safe(out, "news", [*ids, live], since="0-0")
    # Nothing of the channel was trimmed: the broker may say so (its decision).
    assert recovered in (True, False)


def test_a_trimmed_channel_from_the_beginning_is_not_recovered(clock: Clock) -> None:
    broker = HeldBroker(clock, history_size=3)
    hub = Hub(broker, clock=clock)
    ids = [publish(broker, clock, "news", n) for n in range(6)]
    out = Outlet()
    Session(hub, out).subscribe("news", "0-0")
    clock.advance(0)
    assert out.ack("news") == (False, ids[-1])
    assert out.replayed == ids[-3:]


def test_replayed_messages_arriving_live_later_are_not_sent_twice(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    ids = [publish(broker, clock, "news", n) for n in range(2)]
    out = Outlet()
    broker.hold_reads = True
    Session(hub, out).subscribe("news", ids[0])
    clock.advance(0)
    broker.hold_bus = True
    late = publish(broker, clock, "news", 2)
    broker.answer_reads()
    assert out.ack("news") == (True, late)
    assert out.replayed == [ids[1], late]
    broker.release_bus()
    clock.advance(0)
    after = publish(broker, clock, "news", 3)
    assert out.ids("news") == [ids[1], late, after]
    assert_safe(out, "news", [*ids, late, after], since=ids[0])


def test_foreign_messages_never_move_the_cut(broker: HeldBroker, hub: Hub, clock: Clock) -> None:
    """A payload another process PUBLISHed has no id: delivered, and the next
    genuine message is judged against the position, not against it."""
    newest = publish(broker, clock, "news", 0)
    out = Outlet()
    session = Session(hub, out)
    broker.hold_reads = True
    session.subscribe("news")
    clock.advance(0)
    foreign = Message("news", None, envelope("news", None, b'"from elsewhere"'))
    session.deliver(foreign)  # buffered with the read in flight
    broker.answer_reads()
    assert out.ack("news") == (False, newest)
    session.deliver(foreign)  # cut in place: still delivered
    assert out.ids("news") == [None, None]
    session.deliver(Message("news", newest, envelope("news", newest, b"0")))  # a late duplicate
    after = publish(broker, clock, "news", 1)
    assert out.ids("news") == [None, None, after]


def test_a_read_that_fails_leaves_the_subscription_live_without_position(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    from twisted.internet.defer import fail

    from pushd.broker import BrokerUnavailable

    publish(broker, clock, "news", 0)
    broker.last_id = lambda channel: fail(BrokerUnavailable())  # type: ignore[method-assign]
    out = Outlet()
    Session(hub, out).subscribe("news")
    clock.advance(0)
    assert out.ack("news") == (False, None)
    msg = publish(broker, clock, "news", 1)
    assert out.ids("news") == [msg]


# Interleavings: before the subscription, then with the read in flight, each
# message is published with its pub/sub on time or late; the read's snapshot
# comes at one moment of that; more messages after the answer.
_steps = st.lists(st.sampled_from(["publish", "publish-late", "release"]), max_size=8)


@settings(max_examples=200, deadline=None)
@given(
    before=st.integers(0, 3),
    during=_steps,
    snapshot_at=st.integers(0, 8),
    after=st.integers(0, 3),
    since=st.sampled_from([None, "first", "0-0", "ahead"]),
)
def test_every_interleaving_keeps_the_position_safe(
    before: int, during: list[str], snapshot_at: int, after: int, since: str | None
) -> None:
    clock = Clock()
    clock.advance(1_700_000_000)
    broker = HeldBroker(clock)
    hub = Hub(broker, clock=clock)
    ids = [publish(broker, clock, "c", n) for n in range(before)]
    if since == "first":
        since = ids[0] if ids else None
    elif since == "ahead":
        since = "9999999999999-0"
    out = Outlet()
    broker.hold_reads = True
    Session(hub, out).subscribe("c", since)
    clock.advance(0)
    answered = False
    for n, step in enumerate(during):
        if n == snapshot_at:
            broker.answer_reads()
            answered = True
        if step == "release":
            broker.release_bus()
            clock.advance(0)
            continue
        broker.hold_bus = broker.hold_bus or step == "publish-late"
        ids.append(publish(broker, clock, "c", len(ids)))
    if not answered:
        broker.answer_reads()
    broker.release_bus()
    clock.advance(0)
    ids += [publish(broker, clock, "c", len(ids)) for _ in range(after)]
    assert_safe(out, "c", ids, since=since if since != "9999999999999-0" else None)
    # A position is always an id of the channel (or None: it had none).
    _, position = out.ack("c")
    assert position is None or position in ids or position == since


# -- the rest of a Session's life: subscribing twice, leaving while the read is
# in flight, the application's commands, the personal channel, closing, bursts,
# the replay flag, history that expired or was trimmed past `since`, reads that fail.


def publish_now(broker: HeldBroker, n: int) -> str:
    """Publish without ending the turn (the hub hands out at its end)."""
    published: Any = broker.publish("news", b"%d" % n).result
    return str(published.id)


class Recording(Outlet):
    """The test_session outlet, keeping the delivery objects too."""

    def __init__(self) -> None:
        super().__init__()
        self.deliveries: list[Any] = []
        self.replaying_seen: list[bool] = []

    def message(self, message: Any) -> None:
        self.deliveries.append(message)
        self.replaying_seen.append(self.replaying)
        super().message(message)


def test_subscribing_twice_raises_and_changes_nothing(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    out = Outlet()
    session = Session(hub, out)
    session.subscribe("news")
    clock.advance(0)
    with pytest.raises(AlreadySubscribed):
        session.subscribe("news")
        clock.advance(0)
    assert out.events == [("subscribed", "news", False, None)]
    assert hub.count("news") == 1 and len(session) == 1 and "news" in session


def test_leaving_while_the_read_is_in_flight_acknowledges_nothing(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    publish(broker, clock, "news", 0)
    out = Outlet()
    session = Session(hub, out)
    broker.hold_reads = True
    done = session.subscribe("news", "0-0")
    clock.advance(0)
    publish(broker, clock, "news", 1)  # buffered
    assert session.unsubscribe("news") is True
    assert hub.count("news") == 0
    broker.answer_reads()
    assert done.called
    publish(broker, clock, "news", 2)
    assert out.events == []  # no `subscribed`, no replay, nothing buffered let out


def test_leaving_and_joining_again_while_the_first_read_is_in_flight(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    """The late answer of the first read is not taken for the second subscription's."""
    first = publish(broker, clock, "news", 0)
    out = Outlet()
    session = Session(hub, out)
    broker.hold_reads = True
    session.subscribe("news", "0-0")
    clock.advance(0)
    session.unsubscribe("news")
    session.subscribe("news")  # also held
    clock.advance(0)
    broker.answer_reads()
    # One acknowledgement: the second subscription's (no since, no replay).
    assert out.events == [("subscribed", "news", False, first)]
    later = publish(broker, clock, "news", 1)
    assert out.ids("news") == [later]


def test_the_applications_unsubscribe_is_told_the_clients_is_not(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    out = Outlet()
    session = Session(hub, out)
    session.subscribe("a")
    clock.advance(0)
    session.subscribe("b")
    clock.advance(0)
    assert session.unsubscribe("a", tell=True) is True
    assert session.unsubscribe("b") is True
    assert session.unsubscribe("c", tell=True) is False
    assert [e for e in out.events if e[0] == "unsubscribed"] == [("unsubscribed", "a")]
    assert len(session) == 0 and hub.count("a") == hub.count("b") == 0


def test_disconnect_goes_to_the_outlet(broker: HeldBroker, hub: Hub) -> None:
    out = Outlet()
    Session(hub, out).disconnect()
    assert out.events == [("disconnect",)]


def test_identify_joins_the_personal_channel_once(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    out = Outlet()
    session = Session(hub, out)
    d = session.identify("alice", "user#alice")
    clock.advance(0)
    assert d.called and session.user == "alice"
    assert hub.users() == {"alice": 1}
    assert out.events == [("subscribed", "user#alice", False, None)]
    # Already in it (the URL asked for it with `since`): not joined again.
    out2 = Outlet()
    session2 = Session(hub, out2)
    session2.subscribe("user#alice", "0-0")
    clock.advance(0)
    session2.identify("alice", "user#alice")
    clock.advance(0)
    assert [e[0] for e in out2.events] == ["subscribed"]
    assert hub.users() == {"alice": 2}
    msg = publish(broker, clock, "user#alice", 1)
    assert out.ids("user#alice") == out2.ids("user#alice") == [msg]


def test_identify_without_a_personal_channel(broker: HeldBroker, hub: Hub) -> None:
    out = Outlet()
    session = Session(hub, out)
    assert session.identify("bob", None).called
    assert out.events == [] and len(session) == 0 and hub.users() == {"bob": 1}


def test_close_leaves_nothing_in_the_hub(broker: HeldBroker, hub: Hub, clock: Clock) -> None:
    out = Outlet()
    session = Session(hub, out)
    broker.hold_reads = True
    session.subscribe("pending")  # its read still in flight
    clock.advance(0)
    broker.hold_reads = False
    session.subscribe("live")
    clock.advance(0)
    session.identify("carol", "user#carol")
    clock.advance(0)
    session.close()
    assert hub.channels() == {} and hub.users() == {}
    assert len(session) == 0 and session.user is None
    broker.answer_reads()
    publish(broker, clock, "live", 1)
    publish(broker, clock, "pending", 1)
    assert [e[1] for e in out.events] == ["live", "user#carol"]  # the acks made before
    session.close()  # twice: nothing happens


def test_the_application_commands_reach_an_identified_session(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    out = Outlet()
    session = Session(hub, out)
    session.identify("dave", None)
    clock.advance(0)
    assert hub.control({"cmd": "subscribe", "user": "dave", "channel": "room"}) == 1
    assert hub.control({"cmd": "subscribe", "user": "dave", "channel": "room"}) == 0
    clock.advance(0)
    assert out.events == [("subscribed", "room", False, None)]
    assert hub.control({"cmd": "unsubscribe", "user": "dave", "channel": "room"}) == 1
    assert out.events[-1:] == [("unsubscribed", "room")]
    session.subscribe("gone")
    clock.advance(0)
    assert hub.control({"cmd": "destroy", "channel": "gone"}) == 1
    assert out.events[-1:] == [("unsubscribed", "gone")] and "gone" not in session
    assert hub.control({"cmd": "disconnect", "user": "dave"}) == 1
    assert out.events[-1:] == [("disconnect",)]


def test_a_turns_messages_come_as_one_burst_the_same_object_for_every_session(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    outs = [Recording(), Recording()]
    for out in outs:
        Session(hub, out).subscribe("news")
        clock.advance(0)
    ids = [publish_now(broker, n) for n in range(3)]
    clock.advance(0)
    (first,) = outs[0].deliveries
    (second,) = outs[1].deliveries
    assert isinstance(first, Burst) and first is second
    assert [m.id for m in first.messages] == ids


def test_a_replay_is_one_burst_marked_as_replaying(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    ids = [publish(broker, clock, "news", n) for n in range(3)]
    out = Recording()
    Session(hub, out).subscribe("news", ids[0])
    clock.advance(0)
    assert out.replaying_seen == [True] and not out.replaying
    (replay,) = out.deliveries
    assert isinstance(replay, Burst) and [m.id for m in replay.messages] == ids[1:]
    live = publish(broker, clock, "news", 3)
    assert out.replaying_seen == [True, False] and out.ids("news") == [*ids[1:], live]


def test_replaying_is_reset_when_the_outlet_raises(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    first = publish(broker, clock, "news", 0)
    publish(broker, clock, "news", 1)

    class Raising(Outlet):
        def message(self, message: Any) -> None:
            raise RuntimeError("transport gone")

    out = Raising()
    Session(hub, out).subscribe("news", first)
    clock.advance(0)
    assert out.replaying is False


def test_a_message_of_a_channel_not_subscribed_is_ignored(broker: HeldBroker, hub: Hub) -> None:
    from pushd.message import Message, envelope

    out = Outlet()
    session = Session(hub, out)
    session.deliver(Message("other", "1-0", envelope("other", "1-0", b"1")))
    assert out.events == []


def test_since_the_newest_id_is_recovered_with_nothing_to_replay(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    ids = [publish(broker, clock, "news", n) for n in range(2)]
    out = Outlet()
    Session(hub, out).subscribe("news", ids[-1])
    clock.advance(0)
    assert out.ack("news") == (True, ids[-1]) and out.ids("news") == []
    live = publish(broker, clock, "news", 2)
    assert out.ids("news") == [live]


def test_since_an_id_trimmed_away_is_not_recovered(clock: Clock) -> None:
    broker = HeldBroker(clock, history_size=3)
    hub = Hub(broker, clock=clock)
    ids = [publish(broker, clock, "news", n) for n in range(6)]
    out = Outlet()
    Session(hub, out).subscribe("news", ids[1])
    clock.advance(0)
    assert out.ack("news") == (False, ids[-1])
    assert out.replayed == ids[-3:]
    # Since the oldest retained one's predecessor: nothing is missing.
    out2 = Outlet()
    Session(hub, out2).subscribe("news", ids[2])
    clock.advance(0)
    assert out2.ack("news") == (True, ids[-1]) and out2.replayed == ids[-3:]


def test_since_before_an_expired_history_is_not_recovered(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    """The history lives --history-ttl after its last message (3600 s here): past
    that, a resume cannot be promised; the channel has no history: no position."""
    ids = [publish(broker, clock, "news", n) for n in range(2)]
    clock.advance(3601)
    out = Outlet()
    Session(hub, out).subscribe("news", ids[0])
    clock.advance(0)
    recovered, position = out.ack("news")
    assert recovered is False and out.replayed == []
    assert position is None
    live = publish(broker, clock, "news", 2)
    assert out.ids("news") == [live]
    assert parse_id(live) > parse_id(ids[-1])  # ids go on increasing past the expiry


def test_a_history_read_that_fails_goes_live_unrecovered(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    first = publish(broker, clock, "news", 0)
    broker.history = lambda *a: fail(BrokerUnavailable())  # type: ignore[method-assign]
    out = Outlet()
    Session(hub, out).subscribe("news", first)
    clock.advance(0)
    assert out.ack("news") == (False, None)
    live = publish(broker, clock, "news", 1)
    assert out.ids("news") == [live]


def test_an_unexpected_read_error_leaves_no_subscription_buffering_forever(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    broker.last_id = lambda channel: fail(ValueError("odd entry"))  # type: ignore[method-assign]
    out = Outlet()
    session = Session(hub, out)
    session.subscribe("news")
    clock.advance(0)
    for n in range(3):
        publish(broker, clock, "news", n)
    # Either the client hears of the subscription (and gets the messages), or
    # the session is out of the channel: never a silent, growing buffer.
    assert out.events or ("news" not in session and hub.count("news") == 0), session._subs


def test_a_hub_subscription_that_never_completes_holds_the_acknowledgement(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    """Until the broker feeds the channel (Redis SUBSCRIBE answered), nothing is
    read and nothing acknowledged; then the usual order."""
    waiting: Deferred[None] = Deferred()
    broker.subscribe = lambda channel: waiting  # type: ignore[method-assign]
    out = Outlet()
    Session(hub, out).subscribe("news")
    clock.advance(0)
    assert out.events == []
    waiting.callback(None)
    clock.advance(0)
    assert out.events == [("subscribed", "news", False, None)]


# -- reads shared by the sessions that ask the same in one turn (pushd.reads)


class SameObject(Outlet):
    """An Outlet that also keeps the delivery objects it was handed."""

    def __init__(self) -> None:
        super().__init__()
        self.handed: list[Any] = []

    def message(self, message: Any) -> None:
        self.handed.append(message)
        super().message(message)


def test_sessions_resuming_together_share_one_read_and_one_replay(
    broker: HeldBroker, clock: Clock
) -> None:
    metrics = Metrics()
    hub = Hub(broker, metrics, clock=clock)
    ids = [publish(broker, clock, "news", n) for n in range(5)]
    outs = [SameObject() for _ in range(20)]
    broker.hold_reads = True
    for out in outs:
        Session(hub, out).subscribe("news", ids[1])
    other = SameObject()
    Session(hub, other).subscribe("news", ids[3])  # another starting point: its own read
    fresh = SameObject()
    Session(hub, fresh).subscribe("news")  # the newest id: its own read
    assert broker._reads == []  # asked, not sent: the reads go at the end of the turn
    clock.advance(0)
    assert len(broker._reads) == 3
    during = publish(broker, clock, "news", 5)  # after the read was sent, before its answer
    broker.answer_reads()
    for out in outs:
        assert out.ack("news") == (True, during)
        assert out.ids("news") == [*ids[2:], during]
        assert_safe(out, "news", [*ids, during], since=ids[1])
    # One replay (one Burst, its frames made once) for the twenty of them.
    assert len({id(out.handed[0]) for out in outs}) == 1
    assert other.ids("news") == [ids[4], during]
    assert fresh.ack("news") == (False, during) and fresh.ids("news") == []
    assert _sample(metrics, "pushd_subscription_reads_total") == 3
    assert _sample(metrics, "pushd_subscription_reads_shared_total") == 19


def test_a_session_asking_after_the_read_was_sent_gets_its_own(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    """A read sent before a session joined could not have seen what was
    published in between, and the session did not get it live: not shared."""
    ids = [publish(broker, clock, "news", n) for n in range(3)]
    broker.hold_reads = True
    first = Outlet()
    Session(hub, first).subscribe("news", ids[0])
    clock.advance(0)
    assert len(broker._reads) == 1
    between = publish(broker, clock, "news", 3)  # the first read is in flight
    second = Outlet()
    Session(hub, second).subscribe("news", ids[0])
    clock.advance(0)
    assert len(broker._reads) == 2
    broker.answer_reads()
    assert first.ids("news") == [*ids[1:], between]
    assert second.ids("news") == [*ids[1:], between]
    assert_safe(second, "news", [*ids, between], since=ids[0])


def test_a_shared_read_that_fails_leaves_every_session_live_unrecovered(
    broker: HeldBroker, clock: Clock
) -> None:
    metrics = Metrics()
    hub = Hub(broker, metrics, clock=clock)
    ids = [publish(broker, clock, "news", n) for n in range(3)]
    broker.hold_reads = True
    outs = [Outlet() for _ in range(3)]
    for out in outs:
        Session(hub, out).subscribe("news", ids[0])
    clock.advance(0)
    ((d, _),) = broker._reads
    broker._reads.clear()
    d.errback(BrokerUnavailable("Redis down"))
    live = publish(broker, clock, "news", 3)
    for out in outs:
        assert out.ack("news") == (False, None)
        assert out.ids("news") == [live]
    assert _sample(metrics, "pushd_subscription_reads_failed_total") == 1


def _read_failure_lines(events: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == "pushd.reads"]


def test_an_outage_failing_a_storms_reads_says_so_in_one_line(
    broker: HeldBroker, clock: Clock, log_events: list[LogEvent]
) -> None:
    """A thousand sessions of a thousand channels come back while Redis is
    down: a thousand failed reads, each counted, said in ONE log line."""
    metrics = Metrics()
    hub = Hub(broker, metrics, clock=clock)
    since = publish(broker, clock, "c0", 0)
    broker.hold_reads = True
    for n in range(1000):
        Session(hub, Outlet()).subscribe(f"c{n}", since)
    clock.advance(0)
    reads, broker._reads = broker._reads, []
    assert len(reads) == 1000
    for d, _ in reads:
        d.errback(BrokerUnavailable("Redis down"))
    clock.advance(0)
    assert _sample(metrics, "pushd_subscription_reads_failed_total") == 1000
    (line,) = _read_failure_lines(log_events)
    assert line == (
        "1000 subscription reads failed, the first of c0 (since "
        f"{since}): Redis down; 1000 subscriptions go on live without them"
    )


def test_failed_reads_are_logged_once_a_second_at_most_and_all_counted(
    broker: HeldBroker, clock: Clock, log_events: list[LogEvent]
) -> None:
    metrics = Metrics()
    hub = Hub(broker, metrics, clock=clock)
    broker.hold_reads = True
    for turn in range(30):  # a failed read each 0.1 s, for 3 s
        Session(hub, Outlet()).subscribe(f"c{turn}", None)
        clock.advance(0)
        ((d, _),) = broker._reads
        broker._reads.clear()
        d.errback(BrokerUnavailable("Redis down"))
        clock.advance(0.1)
    clock.advance(1)
    lines = _read_failure_lines(log_events)
    assert 3 <= len(lines) <= 4
    assert lines[0] == (
        "a subscription read of c0 (since None) failed: Redis down; "
        "1 subscriptions go on live without it"
    )
    said = [1] + [int(line.split()[0]) for line in lines[1:]]
    assert sum(said) == 30 == _sample(metrics, "pushd_subscription_reads_failed_total")
    assert clock.getDelayedCalls() == []


def _sample(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


def test_acknowledged_fires_once_the_subscription_under_way_is(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    """What a client's own publish waits for (pushd.transports.websocket)."""
    session = Session(hub, Outlet())
    assert session.acknowledged("news", 1.0, clock) is None  # nothing under way
    broker.hold_reads = True
    session.subscribe("news")
    first, second = (
        session.acknowledged("news", 1.0, clock),
        session.acknowledged("news", 1.0, clock),
    )
    assert first is not None and second is not None
    clock.advance(0)
    assert not first.called
    broker.answer_reads()
    assert first.called and second.called
    assert session.acknowledged("news", 1.0, clock) is None  # live now
    # Left while under way: what waits goes on too (nothing to wait for).
    broker.hold_reads = True
    session.subscribe("other")
    gone = session.acknowledged("other", 1.0, clock)
    assert gone is not None
    session.unsubscribe("other")
    clock.advance(0)
    broker.answer_reads()
    assert gone.called
    assert session._acks is None
    # A subscription the broker cannot complete holds what waits `within`
    # seconds after the first ask, all of it together, and no longer.
    broker.hold_reads = True
    session.subscribe("stuck")
    first = session.acknowledged("stuck", 1.0, clock)
    clock.advance(0.6)
    later = session.acknowledged("stuck", 1.0, clock)
    assert first is not None and later is not None
    clock.advance(0.4)
    assert first.called and later.called
    after = session.acknowledged("stuck", 1.0, clock)
    assert after is not None and after.called  # its time ran out: at once
    broker.answer_reads()  # acknowledged at last: nothing fires twice

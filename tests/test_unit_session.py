"""pushd.session on a task.Clock, beside tests/test_session.py (which plays the
race of the read and the bus): here the rest of a Session's life — subscribing
twice, leaving while the read is in flight, the application's commands, the
personal channel, closing, bursts, the replay flag, history that expired or
was trimmed past `since`, and reads that fail.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from pushd.broker import BrokerUnavailable
from pushd.hub import Hub
from pushd.message import Burst, parse_id
from pushd.session import AlreadySubscribed, Session
from tests.test_session import HeldBroker, Outlet, publish


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(1_700_000_000)
    return c


@pytest.fixture
def broker(clock: Clock) -> HeldBroker:
    return HeldBroker(clock)


@pytest.fixture
def hub(broker: HeldBroker, clock: Clock) -> Hub:
    return Hub(broker, clock=clock)


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


def test_subscribing_twice_raises_and_changes_nothing(broker: HeldBroker, hub: Hub) -> None:
    out = Outlet()
    session = Session(hub, broker, out)
    session.subscribe("news")
    with pytest.raises(AlreadySubscribed):
        session.subscribe("news")
    assert out.events == [("subscribed", "news", False, None)]
    assert hub.count("news") == 1 and len(session) == 1 and "news" in session


def test_leaving_while_the_read_is_in_flight_acknowledges_nothing(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    publish(broker, clock, "news", 0)
    out = Outlet()
    session = Session(hub, broker, out)
    broker.hold_reads = True
    done = session.subscribe("news", "0-0")
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
    session = Session(hub, broker, out)
    broker.hold_reads = True
    session.subscribe("news", "0-0")
    session.unsubscribe("news")
    session.subscribe("news")  # also held
    broker.answer_reads()
    # One acknowledgement: the second subscription's (no since, no replay).
    assert out.events == [("subscribed", "news", False, first)]
    later = publish(broker, clock, "news", 1)
    assert out.ids("news") == [later]


def test_the_applications_unsubscribe_is_told_the_clients_is_not(
    broker: HeldBroker, hub: Hub
) -> None:
    out = Outlet()
    session = Session(hub, broker, out)
    session.subscribe("a")
    session.subscribe("b")
    assert session.unsubscribe("a", tell=True) is True
    assert session.unsubscribe("b") is True
    assert session.unsubscribe("c", tell=True) is False
    assert [e for e in out.events if e[0] == "unsubscribed"] == [("unsubscribed", "a")]
    assert len(session) == 0 and hub.count("a") == hub.count("b") == 0


def test_disconnect_goes_to_the_outlet(broker: HeldBroker, hub: Hub) -> None:
    out = Outlet()
    Session(hub, broker, out).disconnect()
    assert out.events == [("disconnect",)]


def test_identify_joins_the_personal_channel_once(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    out = Outlet()
    session = Session(hub, broker, out)
    d = session.identify("alice", "user#alice")
    assert d.called and session.user == "alice"
    assert hub.users() == {"alice": 1}
    assert out.events == [("subscribed", "user#alice", False, None)]
    # Already in it (the URL asked for it with `since`): not joined again.
    out2 = Outlet()
    session2 = Session(hub, broker, out2)
    session2.subscribe("user#alice", "0-0")
    session2.identify("alice", "user#alice")
    assert [e[0] for e in out2.events] == ["subscribed"]
    assert hub.users() == {"alice": 2}
    msg = publish(broker, clock, "user#alice", 1)
    assert out.ids("user#alice") == out2.ids("user#alice") == [msg]


def test_identify_without_a_personal_channel(broker: HeldBroker, hub: Hub) -> None:
    out = Outlet()
    session = Session(hub, broker, out)
    assert session.identify("bob", None).called
    assert out.events == [] and len(session) == 0 and hub.users() == {"bob": 1}


def test_close_leaves_nothing_in_the_hub(broker: HeldBroker, hub: Hub, clock: Clock) -> None:
    out = Outlet()
    session = Session(hub, broker, out)
    broker.hold_reads = True
    session.subscribe("pending")  # its read still in flight
    broker.hold_reads = False
    session.subscribe("live")
    session.identify("carol", "user#carol")
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
    session = Session(hub, broker, out)
    session.identify("dave", None)
    assert hub.control({"cmd": "subscribe", "user": "dave", "channel": "room"}) == 1
    assert hub.control({"cmd": "subscribe", "user": "dave", "channel": "room"}) == 0
    assert out.events == [("subscribed", "room", False, None)]
    assert hub.control({"cmd": "unsubscribe", "user": "dave", "channel": "room"}) == 1
    assert out.events[-1:] == [("unsubscribed", "room")]
    session.subscribe("gone")
    assert hub.control({"cmd": "destroy", "channel": "gone"}) == 1
    assert out.events[-1:] == [("unsubscribed", "gone")] and "gone" not in session
    assert hub.control({"cmd": "disconnect", "user": "dave"}) == 1
    assert out.events[-1:] == [("disconnect",)]


def test_a_turns_messages_come_as_one_burst_the_same_object_for_every_session(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    outs = [Recording(), Recording()]
    for out in outs:
        Session(hub, broker, out).subscribe("news")
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
    Session(hub, broker, out).subscribe("news", ids[0])
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
    Session(hub, broker, out).subscribe("news", first)
    assert out.replaying is False


def test_a_message_of_a_channel_not_subscribed_is_ignored(broker: HeldBroker, hub: Hub) -> None:
    from pushd.message import Message, envelope

    out = Outlet()
    session = Session(hub, broker, out)
    session.deliver(Message("other", "1-0", envelope("other", "1-0", b"1")))
    assert out.events == []


def test_since_the_newest_id_is_recovered_with_nothing_to_replay(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    ids = [publish(broker, clock, "news", n) for n in range(2)]
    out = Outlet()
    Session(hub, broker, out).subscribe("news", ids[-1])
    assert out.ack("news") == (True, ids[-1]) and out.ids("news") == []
    live = publish(broker, clock, "news", 2)
    assert out.ids("news") == [live]


def test_since_an_id_trimmed_away_is_not_recovered(clock: Clock) -> None:
    broker = HeldBroker(clock, history_size=3)
    hub = Hub(broker, clock=clock)
    ids = [publish(broker, clock, "news", n) for n in range(6)]
    out = Outlet()
    Session(hub, broker, out).subscribe("news", ids[1])
    assert out.ack("news") == (False, ids[-1])
    assert out.replayed == ids[-3:]
    # Since the oldest retained one's predecessor: nothing is missing.
    out2 = Outlet()
    Session(hub, broker, out2).subscribe("news", ids[2])
    assert out2.ack("news") == (True, ids[-1]) and out2.replayed == ids[-3:]


def test_since_before_an_expired_history_is_not_recovered(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    """The history lives --history-ttl after its last message (3600 s here): past
    that, a resume cannot be promised; the channel has no history: no position."""
    ids = [publish(broker, clock, "news", n) for n in range(2)]
    clock.advance(3601)
    out = Outlet()
    Session(hub, broker, out).subscribe("news", ids[0])
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
    Session(hub, broker, out).subscribe("news", first)
    assert out.ack("news") == (False, None)
    live = publish(broker, clock, "news", 1)
    assert out.ids("news") == [live]


def test_an_unexpected_read_error_leaves_no_subscription_buffering_forever(
    broker: HeldBroker, hub: Hub, clock: Clock
) -> None:
    broker.last_id = lambda channel: fail(ValueError("odd entry"))  # type: ignore[method-assign]
    out = Outlet()
    session = Session(hub, broker, out)
    session.subscribe("news")
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
    Session(hub, broker, out).subscribe("news")
    assert out.events == []
    waiting.callback(None)
    assert out.events == [("subscribed", "news", False, None)]

"""pushd.presence on a task.Clock with the memory broker: join/leave
coalescing and its rate, queries after the node's own writes; the stored
member format and presence events on the bus, as properties."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from pushd.broker import NoClients
from pushd.broker.members import split, stored
from pushd.broker.memory import MemoryBroker
from pushd.message import (
    PRESENCE_MARKER,
    Message,
    PresenceEvent,
    presence_event,
    presence_payload,
)
from pushd.presence import JOIN_LEAVE_BURST, JOIN_LEAVE_WINDOW, Presence


class Bus(NoClients):
    """What the memory broker hands out for subscribed channels."""

    def __init__(self) -> None:
        self.payloads: list[tuple[str, bytes]] = []

    def receive(self, channel: str, payload: bytes) -> None:
        self.payloads.append((channel, payload))

    def events(self) -> list[tuple[str, str]]:
        out = []
        for channel, payload in self.payloads:
            for event in Message.from_bus(channel, payload):
                assert isinstance(event, PresenceEvent)
                body = json.loads(event.payload)
                out.append((body["type"], body["member"]["client"]))
        return out


def node(join_leave: tuple[str, ...] = ("room:*",)) -> tuple[Presence, MemoryBroker, Bus, Clock]:
    clock = Clock()
    broker = MemoryBroker(clock, 100, 3600)
    bus = Bus()
    broker.attach(bus)
    broker.subscribe("room:1")
    presence = Presence(broker, patterns=(), join_leave=join_leave, clock=clock)
    return presence, broker, bus, clock


def answer(presence: Presence, channel: str, clock: Clock) -> dict[str, Any]:
    got: list[bytes] = []
    presence.query(channel).addCallback(got.append)
    clock.advance(0)
    assert got, "the query was not answered"
    return dict(json.loads(got[0]))


def test_a_client_that_comes_and_goes_within_a_window_is_never_announced() -> None:
    presence, _, bus, clock = node()
    presence.join("room:1", "n.1", "ann", b"null")
    clock.advance(JOIN_LEAVE_WINDOW / 2)
    presence.leave("room:1", "n.1")
    clock.advance(JOIN_LEAVE_WINDOW * 4)
    assert bus.payloads == []
    assert answer(presence, "room:1", clock)["count"] == 0


def test_events_wait_a_window_and_go_out_as_one_payload() -> None:
    presence, _, bus, clock = node()
    for n in range(5):
        presence.join("room:1", f"n.{n}", f"u{n}", b"null")
    clock.advance(JOIN_LEAVE_WINDOW - 0.01)
    assert bus.payloads == []
    clock.advance(0.01)
    assert len(bus.payloads) == 1
    assert bus.events() == [("join", f"n.{n}") for n in range(5)]


def test_a_storm_is_sent_at_the_burst_rate_in_order_and_whole() -> None:
    presence, _, bus, clock = node()
    storm = 3 * JOIN_LEAVE_BURST + 7
    for n in range(storm):
        presence.join("room:1", f"n.{n}", None, b"null")
    sizes = []
    for _ in range(5):
        before = len(bus.payloads)
        clock.advance(JOIN_LEAVE_WINDOW)
        sizes.append(sum(len(Message.from_bus(c, p)) for c, p in bus.payloads[before:]))
    assert sizes == [JOIN_LEAVE_BURST] * 3 + [7, 0]
    assert bus.events() == [("join", f"n.{n}") for n in range(storm)]
    # A leave whose join is still waiting cancels it; the others are queued.
    for n in range(storm):
        presence.join("room:1", f"m.{n}", None, b"null")
    for n in range(storm):
        presence.leave("room:1", f"m.{n}")
    presence.leave("room:1", "n.0")
    bus.payloads.clear()
    clock.advance(JOIN_LEAVE_WINDOW * 10)
    assert bus.events() == [("leave", "n.0")]


def test_no_events_for_channels_without_join_leave() -> None:
    presence, _, bus, clock = node(join_leave=())
    presence = Presence(presence._broker, patterns=("room:*",), clock=clock)
    presence.join("room:1", "n.1", "ann", b'{"a":1}')
    clock.advance(JOIN_LEAVE_WINDOW * 4)
    assert bus.payloads == []
    body = answer(presence, "room:1", clock)
    assert body == {
        "channel": "room:1",
        "count": 1,
        "users": 1,
        "clients": [{"client": "n.1", "user": "ann", "info": {"a": 1}}],
    }


def test_a_query_is_read_after_the_nodes_own_writes() -> None:
    presence, _, _, clock = node()
    presence.join("room:1", "n.1", "ann", b"null")
    presence.join("room:1", "n.2", "ann", b"null")
    presence.join("room:1", "n.3", None, b"null")
    # Not yet written (the write waits for the end of the turn): the query waits too.
    got: list[bytes] = []
    presence.query("room:1").addCallback(got.append)
    presence.leave("room:1", "n.2")
    assert got == []
    clock.advance(0)
    clock.advance(0)
    body = json.loads(got[0])
    assert (body["count"], body["users"]) == (2, 1)
    assert presence.count() == 2


def test_departed_members_are_announced_and_garbage_is_not() -> None:
    presence, _, bus, clock = node()
    presence.departed(
        "room:1",
        [stored("x.1", "bo", b"null"), b"garbage", b'3:uab{"client":2}', b"99:u"],
    )
    clock.advance(JOIN_LEAVE_WINDOW)
    assert bus.events() == [("leave", "x.1")]


@given(
    st.text(min_size=1, max_size=20),
    st.one_of(st.none(), st.text(max_size=30)),
    st.sampled_from([b"null", b'{"name":"A"}', b"[1,2]", b'"x"']),
)
def test_stored_members_split_back(client: str, user: str | None, info: bytes) -> None:
    key, member = split(stored(client, user, info))
    assert key == (b"" if user is None else b"u" + user.encode("utf-8", "surrogatepass"))
    assert json.loads(member) == {"client": client, "user": user, "info": json.loads(info)}


@given(st.binary(max_size=200))
def test_any_payload_after_the_presence_marker_is_events_or_one_foreign_message(
    tail: bytes,
) -> None:
    messages = Message.from_bus("room:1", PRESENCE_MARKER + tail)
    if len(messages) == 1 and type(messages[0]) is Message:
        assert messages[0].id is None
        assert json.loads(messages[0].payload)["type"] == "message"
        return
    for event in messages:
        assert isinstance(event, PresenceEvent)
        body = json.loads(event.payload)
        assert body["type"].encode() == event.event and body["channel"] == "room:1"
        assert b"\n" not in event.payload and b"\r" not in event.payload


@given(st.lists(st.sampled_from([b"join", b"leave"]), min_size=1, max_size=5))
def test_presence_payloads_round_trip(kinds: list[bytes]) -> None:
    member = b'{"client":"n.1","user":null,"info":null}'
    payload = presence_payload([presence_event(k, "room:1", member) for k in kinds])
    events = Message.from_bus("room:1", payload)
    assert [e.event for e in events if isinstance(e, PresenceEvent)] == kinds
    # On another channel's bus, the same bytes are foreign data.
    assert type(Message.from_bus("room:2", payload)[0]) is Message


class CountingBroker(MemoryBroker):
    reads = 0

    def presence(self, channel: str, limit: int) -> Any:
        self.reads += 1
        return super().presence(channel, limit)


def test_queries_share_a_read_for_a_second_unless_this_node_changed_the_channel() -> None:
    from pushd.presence import QUERY_CACHE

    clock = Clock()
    broker = CountingBroker(clock, 100, 3600)
    presence = Presence(broker, patterns=("room:*",), clock=clock)
    presence.join("room:1", "n.1", "ann", b"null")
    clock.advance(0)
    assert answer(presence, "room:1", clock)["count"] == 1
    assert answer(presence, "room:1", clock)["count"] == 1
    assert broker.reads == 1
    # Another node's change (written straight to the broker): seen after QUERY_CACHE.
    from pushd.broker import PresenceChange
    from pushd.broker.members import stored as stored_member

    broker.update_presence(
        {"room:1": PresenceChange(joins={"m.1": stored_member("m.1", "bo", b"null")})}
    )
    assert answer(presence, "room:1", clock)["count"] == 1
    clock.advance(QUERY_CACHE)
    assert answer(presence, "room:1", clock)["count"] == 2
    assert broker.reads == 2
    # This node's own change: read again at once.
    presence.leave("room:1", "n.1")
    assert answer(presence, "room:1", clock)["count"] == 1
    assert broker.reads == 3
    # Another channel's change does not throw this one's answer away.
    presence.join("room:2", "n.2", None, b"null")
    clock.advance(0)
    assert answer(presence, "room:1", clock)["count"] == 1
    assert broker.reads == 3


def test_a_leave_stays_a_tombstone_until_it_is_announced() -> None:
    from pushd.broker.members import TOMBSTONE

    presence, broker, bus, clock = node()
    presence.join("room:1", "n.1", "ann", b"null")
    clock.advance(JOIN_LEAVE_WINDOW)  # the join is said
    presence.leave("room:1", "n.1")
    clock.advance(0)
    stored_now = broker._members["room:1"]["n.1"]
    assert stored_now.startswith(TOMBSTONE)  # kept, for a reaper to announce
    assert answer(presence, "room:1", clock)["count"] == 0  # but not counted
    clock.advance(JOIN_LEAVE_WINDOW)  # the leave is said...
    clock.advance(0)
    assert "room:1" not in broker._members  # ...and the tombstone goes
    assert bus.events() == [("join", "n.1"), ("leave", "n.1")]


def test_a_member_back_while_its_leave_is_being_said_stays() -> None:
    """The leave goes out (its PUBLISH in flight), the client joins again, then
    the PUBLISH is answered: the tombstone it clears is gone already, and the
    member it would have deleted stays."""
    from twisted.internet.defer import Deferred

    presence, broker, _, clock = node()
    sending: list[Deferred[None]] = []
    broker.announce = lambda channel, payload: sending.append(Deferred()) or sending[-1]  # type: ignore[method-assign]
    presence.join("room:1", "n.1", "ann", b"null")
    clock.advance(JOIN_LEAVE_WINDOW)
    sending.pop().callback(None)  # the join is said
    presence.leave("room:1", "n.1")
    clock.advance(JOIN_LEAVE_WINDOW)  # the leave goes out...
    presence.join("room:1", "n.1", "ann", b"null")  # ...and the client is back
    clock.advance(0)
    sending.pop().callback(None)  # the leave's PUBLISH answered
    clock.advance(0)
    assert not broker._members["room:1"]["n.1"].startswith(b"~")
    assert answer(presence, "room:1", clock)["count"] == 1

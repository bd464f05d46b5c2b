"""The hub's fan-out walk on a Clock: FANOUT_CHUNK deliveries a turn, messages
that come during a walk joining what the subscribers not yet reached get (one
Burst, one send), every subscriber handed every message once and in order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from pushd.broker.memory import MemoryBroker
from pushd.hub import FANOUT_CHUNK, Hub
from pushd.message import Burst, Delivery, Message
from pushd.metrics import Metrics
from tests.test_hub_isolation import sample


class Turns(Clock):
    """A Clock that runs, per `advance`, only the calls due when it began: what
    a call schedules for now waits for the next turn, as in the reactor
    (task.Clock would run it at once)."""

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        due = [c for c in self.getDelayedCalls() if c.getTime() <= self.rightNow]
        for call in sorted(due, key=lambda c: c.getTime()):
            if call.active():
                self.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)


def make() -> tuple[MemoryBroker, Hub, Clock, Metrics]:
    clock = Turns()
    broker = MemoryBroker(clock, history_size=10, history_ttl=60)
    metrics = Metrics()
    return broker, Hub(broker, metrics, clock=clock), clock, metrics


class Counting:
    """A subscriber recording each delivery (a send, for its transport)."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []

    def deliver(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)

    def unsubscribe(self, channel: str, *, tell: bool = False) -> bool:
        return True

    def ids(self) -> list[str | None]:
        return [m.id for d in self.deliveries for m in d.messages]


def drain(clock: Clock, hub: Hub) -> int:
    """Advance turns until the hub has nothing left; how many it took."""
    turns = 0
    while hub._flush_call is not None:
        clock.advance(0)
        turns += 1
        assert turns < 1000
    return turns


def test_a_large_fan_out_is_written_a_chunk_a_turn() -> None:
    broker, hub, clock, metrics = make()
    subs = [Counting() for _ in range(2 * FANOUT_CHUNK + 500)]
    for sub in subs:
        hub.subscribe("news", sub)
    published = broker.publish("news", b"1")
    clock.advance(0)
    assert sum(1 for s in subs if s.deliveries) == FANOUT_CHUNK
    assert drain(clock, hub) == 2
    assert all(s.ids() == [published.result.id] for s in subs)  # type: ignore[attr-defined]
    assert sample(metrics, "pushd_deliveries_total") == len(subs)


def test_messages_that_come_during_a_walk_join_the_rest_of_it() -> None:
    broker, hub, clock, metrics = make()
    subs = [Counting() for _ in range(3 * FANOUT_CHUNK)]
    for sub in subs:
        hub.subscribe("news", sub)
    broker.publish("news", b"1")
    clock.advance(0)  # the first chunk has message 1
    broker.publish("news", b"2")  # came while the walk goes on
    drain(clock, hub)
    first, rest = subs[:FANOUT_CHUNK], subs[FANOUT_CHUNK:]
    # The rest got both in ONE delivery (one frame buffer, one send)...
    assert all(len(s.deliveries) == 1 and isinstance(s.deliveries[0], Burst) for s in rest)
    assert len({id(s.deliveries[0]) for s in rest}) == 1  # made once for them all
    # ...the first chunk got the second message in the next walk.
    assert all(len(s.deliveries) == 2 for s in first)
    expected = subs[0].ids()
    assert len(expected) == 2 and all(s.ids() == expected for s in subs)
    assert sample(metrics, "pushd_deliveries_total") == 2 * len(subs)


def test_who_leaves_during_a_walk_gets_nothing_more_and_who_comes_gets_what_follows() -> None:
    broker, hub, clock, _ = make()
    subs = [Counting() for _ in range(2 * FANOUT_CHUNK)]
    for sub in subs:
        hub.subscribe("news", sub)
    broker.publish("news", b"1")
    clock.advance(0)
    leaving = subs[-1]
    hub.unsubscribe("news", leaving)
    late = Counting()
    hub.subscribe("news", late)
    second = broker.publish("news", b"2").result  # type: ignore[attr-defined]
    drain(clock, hub)
    assert leaving.deliveries == []
    assert late.ids() == [second.id]
    assert all(len(s.ids()) == 2 for s in subs[:-1])
    assert not hub._channels["news"].log  # nothing kept once all had it


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("publish"), st.integers(1, 3)),
            st.tuples(st.just("turn"), st.just(0)),
            st.tuples(st.just("join"), st.integers(1, 900)),
            st.tuples(st.just("leave"), st.integers(0, 10_000)),
        ),
        max_size=30,
    )
)
def test_every_subscriber_gets_what_came_while_it_was_in_once_and_in_order(
    steps: list[tuple[str, int]],
) -> None:
    broker, hub, clock, _ = make()
    subs: list[Counting] = []
    arrived: list[str] = []
    #: Per subscriber: the number of messages arrived when it joined, and when it left.
    joined: dict[int, int] = {}
    left: dict[int, int] = {}
    for kind, n in steps:
        if kind == "publish":
            result = broker.publish_many([("news", b"%d" % k) for k in range(n)])
            arrived += [p.id for p in result.result]  # type: ignore[attr-defined]
        elif kind == "turn":
            clock.advance(0)
        elif kind == "join":
            for _ in range(n):
                subs.append(Counting())
                joined[len(subs) - 1] = len(arrived)
                hub.subscribe("news", subs[-1])
        elif subs:
            index = n % len(subs)
            if index not in left:
                left[index] = len(arrived)
                hub.unsubscribe("news", subs[index])
    drain(clock, hub)
    for index, sub in enumerate(subs):
        got = sub.ids()
        window = arrived[joined[index] : left.get(index, len(arrived))]
        # A prefix of what came while it was in (all of it when it stayed),
        # each once, in order.
        assert got == window[: len(got)]
        if index not in left:
            assert got == window
    assert not hub._due


def test_a_burst_of_one_message_is_the_message_itself() -> None:
    broker, hub, clock, _ = make()
    sub = Counting()
    hub.subscribe("news", sub)
    broker.publish("news", b"1")
    clock.advance(0)
    assert isinstance(sub.deliveries[0], Message)

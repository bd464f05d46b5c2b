"""The hub's bookkeeping and fan-out, on the memory broker with recording subscribers."""

from __future__ import annotations

import json

from twisted.internet.task import Clock

from pushd.broker import UNATTACHED
from pushd.broker.memory import MemoryBroker
from pushd.hub import Hub
from pushd.message import Burst, Delivery, Message, bus_payload, dump_json


class Sink:
    def __init__(self) -> None:
        self.got: list[Message] = []
        self.deliveries: list[Delivery] = []

    def deliver(self, message: Delivery) -> None:
        self.deliveries.append(message)
        self.got.extend(message.messages)


class Turns(Clock):
    """The reactor's clock: `turn()` ends the reactor turn (the hub hands out then)."""

    def turn(self) -> None:
        self.advance(0)


def make() -> tuple[MemoryBroker, Hub, Turns]:
    clock = Turns()
    broker = MemoryBroker(clock, history_size=5, history_ttl=60)
    return broker, Hub(broker, clock=clock), clock


def test_first_subscriber_subscribes_the_broker_last_one_leaves() -> None:
    broker, hub, _ = make()
    a, b = Sink(), Sink()
    hub.subscribe("news", a)
    hub.subscribe("news", b)
    assert broker.subscribed_channels() == {"news"}
    hub.unsubscribe("news", a)
    assert broker.subscribed_channels() == {"news"}
    hub.unsubscribe("news", b)
    assert broker.subscribed_channels() == frozenset()
    assert hub.channels() == {}
    hub.unsubscribe("news", b)  # harmless twice


def test_one_message_object_for_every_subscriber() -> None:
    broker, hub, clock = make()
    sinks = [Sink() for _ in range(3)]
    for sink in sinks:
        hub.subscribe("news", sink)
    broker.publish("news", dump_json("hello"))
    assert sinks[0].got == []  # handed out at the end of the turn
    clock.turn()
    first = sinks[0].got[0]
    assert all(sink.got == [first] for sink in sinks)
    assert first.payload == b'{"type":"message","channel":"news","id":"0-0","data":"hello"}'


def test_a_subscriber_leaving_during_fan_out_does_not_break_it() -> None:
    broker, hub, clock = make()

    class Leaver(Sink):
        def deliver(self, message: Delivery) -> None:
            super().deliver(message)
            hub.unsubscribe("news", self)

    sinks = [Leaver(), Sink(), Leaver()]
    for sink in sinks:
        hub.subscribe("news", sink)
    broker.publish("news", b"1")
    clock.turn()
    broker.publish("news", b"2")
    clock.turn()
    assert [len(s.got) for s in sinks] == [1, 2, 1]


def test_messages_of_one_turn_go_out_together_in_order() -> None:
    broker, hub, clock = make()
    sink, other = Sink(), Sink()
    hub.subscribe("news", sink)
    hub.subscribe("sport", other)
    for n in range(3):
        broker.publish("news", dump_json(n))
    broker.publish("sport", b"1")
    clock.turn()
    assert len(sink.deliveries) == 1 and isinstance(sink.deliveries[0], Burst)
    assert [json.loads(m.payload)["data"] for m in sink.got] == [0, 1, 2]
    assert [m.id for m in other.got] == ["0-0"]
    assert isinstance(other.deliveries[0], Message)


def test_one_bus_payload_may_carry_several_envelopes() -> None:
    _, hub, clock = make()
    sink = Sink()
    hub.subscribe("news", sink)
    lines = [
        b'{"type":"message","channel":"news","id":"5-%d","data":%d}' % (n, n) for n in range(3)
    ]
    hub.receive("news", bus_payload(*lines))
    clock.turn()
    assert [m.payload for m in sink.got] == lines


def test_memory_ids_increase_within_one_millisecond_and_history_expires() -> None:
    clock = Clock()
    clock.advance(1000)
    broker = MemoryBroker(clock, history_size=5, history_ttl=60)
    ids = [broker.publish("c", b"1").result.id for _ in range(3)]
    assert ids == ["1000000-0", "1000000-1", "1000000-2"]
    clock.advance(0.001)
    assert broker.publish("c", b"1").result.id == "1000001-0"
    clock.advance(61)
    assert broker.publish("c", b"1").result.id == "1061001-0"


def test_a_payload_published_straight_into_the_bus_is_wrapped() -> None:
    [message] = Message.from_bus("news", b'{"raw": true}')
    assert message.id is None
    assert message.payload == b'{"type":"message","channel":"news","id":null,"data":{"raw":true}}'
    [text] = Message.from_bus("news", b"just text")
    assert text.payload.endswith(b'"data":"just text"}')


def test_a_gap_after_an_outage_is_filled_from_history_without_duplicates() -> None:
    broker, hub, clock = make()
    sink = Sink()
    hub.subscribe("news", sink)
    broker.publish("news", b"1")
    clock.turn()
    broker.attach(UNATTACHED)  # the bus connection is down
    broker.publish("news", b"2")
    broker.publish("news", b"3")
    broker.attach(hub)
    hub.resume("news")  # subscribed again: the hub reads what it missed
    clock.turn()
    assert [json.loads(m.payload)["data"] for m in sink.got] == [1, 2, 3]
    hub.receive("news", bus_payload(sink.got[1].payload))  # the same message late: dropped
    broker.publish("news", b"4")
    clock.turn()
    assert [m.id for m in sink.got] == ["0-0", "0-1", "0-2", "0-3"]

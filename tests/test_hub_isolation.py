"""The hub's exception boundaries and its trust in the bus, deterministic:
the memory broker, recording subscribers, the reactor's turns on a Clock."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.task import Clock

from pushd.broker.memory import MemoryBroker
from pushd.hub import Hub
from pushd.message import BUS_MARKER, Delivery, Message, bus_payload, envelope
from pushd.metrics import Metrics


class Sink:
    def __init__(self) -> None:
        self.got: list[Message] = []

    def deliver(self, delivery: Delivery) -> None:
        self.got.extend(delivery.messages)

    def unsubscribe(self, channel: str, *, tell: bool = False) -> bool:
        return True

    def data(self) -> list[Any]:
        return [json.loads(m.payload)["data"] for m in self.got]


class Raising(Sink):
    def deliver(self, delivery: Delivery) -> None:
        super().deliver(delivery)
        raise RuntimeError("a subscriber's bug")


def make() -> tuple[MemoryBroker, Hub, Clock, Metrics]:
    clock = Clock()
    broker = MemoryBroker(clock, history_size=10, history_ttl=60)
    metrics = Metrics()
    return broker, Hub(broker, metrics, clock=clock), clock, metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_raising_receiver_leaves_the_others_and_the_other_channels_delivered() -> None:
    broker, hub, clock, metrics = make()
    before, bad, after, other = Sink(), Raising(), Sink(), Sink()
    for sink in (before, bad, after):
        hub.subscribe("news", sink)
    hub.subscribe("sport", other)
    broker.publish("news", b"1")
    broker.publish("sport", b"2")  # flushed after "news" in the same turn
    clock.advance(0)
    assert before.data() == bad.data() == after.data() == [1]
    assert other.data() == [2]
    assert sample(metrics, "pushd_delivery_errors_total") == 1
    assert sample(metrics, "pushd_deliveries_total") == 4
    # Nothing stays queued: the next turn goes out as usual.
    broker.publish("news", b"3")
    broker.publish("sport", b"4")
    clock.advance(0)
    assert after.data() == [1, 3] and other.data() == [2, 4]
    assert sample(metrics, "pushd_delivery_errors_total") == 2
    assert not hub._due and hub._flush_call is None


def test_a_receiver_raising_on_every_channel_stops_no_flush() -> None:
    broker, hub, clock, metrics = make()
    sinks = {}
    for channel in ("a", "b", "c"):
        hub.subscribe(channel, Raising())
        sinks[channel] = Sink()
        hub.subscribe(channel, sinks[channel])
    for n, channel in enumerate(("a", "b", "c")):
        broker.publish(channel, b"%d" % n)
    clock.advance(0)
    assert [sinks[c].data() for c in "abc"] == [[0], [1], [2]]
    assert sample(metrics, "pushd_delivery_errors_total") == 3


def test_a_failing_parse_is_logged_counted_and_the_next_payload_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker, hub, clock, metrics = make()
    sink = Sink()
    hub.subscribe("news", sink)
    real = Message.from_bus

    def broken(channel: str, payload: bytes) -> list[Message]:
        if payload == b"boom":
            raise RuntimeError("a parser's bug")
        return real(channel, payload)

    monkeypatch.setattr(Message, "from_bus", broken)
    hub.receive("news", b"boom")
    broker.publish("news", b"1")
    clock.advance(0)
    assert sink.data() == [1]
    assert sample(metrics, "pushd_bus_errors_total", stage="parse") == 1


def test_foreign_payloads_never_move_the_dedup_position() -> None:
    broker, hub, clock, metrics = make()
    sink = Sink()
    hub.subscribe("news", sink)
    broker.publish("news", b"1")
    clock.advance(0)
    state = hub._channels["news"]
    last = state.last
    forged = envelope("news", "1900000000000-0", b'"forged"')
    hub.receive("news", forged)  # without the marker: data
    hub.receive("news", bus_payload(envelope("other", "1900000000000-0", b"0")))
    hub.receive("news", BUS_MARKER + forged + b"\r")  # a CR: not pushd's
    hub.receive("news", BUS_MARKER + forged + b"\n" + b"junk")  # one bad line spoils all
    hub.receive("news", BUS_MARKER + envelope("news", "x-1", b"0"))  # not an id
    hub.receive("news", BUS_MARKER + envelope("news", "\u0661-0", b"0"))  # digits, not ASCII
    hub.receive("news", BUS_MARKER + envelope("news", f"{2**64}-0", b"0"))  # past 64 bits
    clock.advance(0)
    assert state.last == last
    assert all(m.id is None for m in sink.got[1:]) and len(sink.got) == 8
    assert sink.data()[1] == json.loads(forged)
    broker.publish("news", b"2")  # a genuine message after them all
    clock.advance(0)
    assert sink.data()[-1] == 2 and sink.got[-1].id is not None
    assert sample(metrics, "pushd_bus_foreign_messages_total") == 7
    assert sample(metrics, "pushd_bus_errors_total", stage="take") == 0


def test_pushd_payloads_carry_their_ids_and_move_the_position() -> None:
    _, hub, clock, _ = make()
    sink = Sink()
    hub.subscribe("news", sink)
    lines = [envelope("news", f"5-{n}", b"%d" % n) for n in range(3)]
    hub.receive("news", bus_payload(*lines))
    hub.receive("news", bus_payload(lines[1]))  # already handed out: dropped
    clock.advance(0)
    assert [m.id for m in sink.got] == ["5-0", "5-1", "5-2"]
    assert [m.payload for m in sink.got] == lines
    assert hub._channels["news"].last == (5, 2)


@pytest.mark.parametrize(
    "command",
    [
        {"cmd": "subscribe", "user": "u", "channel": ["x"]},
        {"cmd": "subscribe", "user": "u", "channel": "not a channel!"},
        {"cmd": "destroy", "channel": 7},
        {"cmd": "disconnect", "user": {"a": 1}},
        {"cmd": ["?"]},
        {},
    ],
)
def test_foreign_control_commands_act_on_nothing(command: dict[str, Any]) -> None:
    _, hub, _, _ = make()

    class Session(Sink):
        def __contains__(self, channel: str) -> bool:
            return False

        def subscribe(self, channel: str) -> None:
            raise AssertionError("subscribed by a foreign command")

        def disconnect(self) -> None:
            raise AssertionError("disconnected by a foreign command")

    hub.add_user("u", Session())
    assert hub.control(command) == 0

"""The publish connection (pushd/broker/redis/connection.py) on a Clock and a
StringTransport: the handshake, replies matched in order however they are
cut, what a failure means (503 before sending, 504 after), the watchdog and
reconnecting. The real-Redis side: tests/test_outcomes.py, test_fastpath.py,
test_redis_restart.py, test_sentinel.py."""

from __future__ import annotations

from typing import Any

import hiredis
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.python.failure import Failure

from pushd.broker import BrokerUnavailable, OutcomeUnknown
from pushd.broker.redis.connection import RETRY, PublishConnection, RedisProtocol, command


class FarEnd(StringTransportWithDisconnection):
    """Redis's end: what it received by the end of the turn (the connection
    sends a turn's commands together, at its end)."""

    def __init__(self, reactor: MemoryReactorClock) -> None:
        super().__init__()
        self._reactor = reactor

    def value(self) -> bytes:
        self._reactor.advance(0)
        return bytes(super().value())


class Wire:
    """A PublishConnection on a MemoryReactorClock, and the far end of its
    connection attempts."""

    def __init__(self, handshake: tuple[bytes, ...] = (b"*1\r\n$4\r\nPING\r\n",)) -> None:
        self.reactor = MemoryReactorClock()
        self.ready = 0
        self.connection = PublishConnection(
            self.reactor,
            TCP4ClientEndpoint(self.reactor, "127.0.0.1", 6379),
            lambda: handshake,
            timeout=1.0,
            on_connected=self._ready,
        )
        self.connection.start()

    def _ready(self) -> None:
        self.ready += 1

    def accept(self) -> StringTransportWithDisconnection:
        """Complete the latest connection attempt."""
        _, _, factory, _, _ = self.reactor.tcpClients[-1]
        proto = factory.buildProtocol(None)
        transport = FarEnd(self.reactor)
        transport.protocol = proto
        proto.makeConnection(transport)
        return transport


def results(d: Deferred[Any]) -> list[Any]:
    got: list[Any] = []
    d.addBoth(got.append)
    return got


def test_nothing_is_sent_before_the_handshake_is_answered() -> None:
    wire = Wire()
    assert isinstance(results(wire.connection.execute(b"x"))[0].value, BrokerUnavailable)
    transport = wire.accept()
    assert transport.value() == b"*1\r\n$4\r\nPING\r\n"
    assert not wire.connection.connected and wire.ready == 0
    early = results(wire.connection.execute(b"x"))
    assert isinstance(early[0].value, BrokerUnavailable), "a command before the handshake"
    transport.protocol.dataReceived(b"+PONG\r\n")
    assert wire.connection.connected and wire.ready == 1
    transport.clear()
    got = results(wire.connection.execute(command("EVALSHA", "f" * 40, 0)))
    assert transport.value() == b"*3\r\n$7\r\nEVALSHA\r\n$40\r\n" + b"f" * 40 + b"\r\n$1\r\n0\r\n"
    transport.protocol.dataReceived(b"*2\r\n:0\r\n$3\r\n1-0\r\n")
    assert got == [[0, "1-0"]]


def test_a_refused_handshake_drops_the_connection_and_retries() -> None:
    wire = Wire()
    transport = wire.accept()
    transport.protocol.dataReceived(b"-WRONGPASS invalid username-password pair\r\n")
    assert transport.disconnected and not wire.connection.connected
    attempts = len(wire.reactor.tcpClients)
    wire.reactor.advance(RETRY(1) + 1)  # backoffPolicy: at most its delay, jitter included
    assert len(wire.reactor.tcpClients) == attempts + 1, "no new attempt after the refusal"
    wire.accept().protocol.dataReceived(b"+PONG\r\n")
    assert wire.connection.connected


def ready_wire() -> tuple[Wire, StringTransportWithDisconnection]:
    wire = Wire()
    transport = wire.accept()
    transport.protocol.dataReceived(b"+PONG\r\n")
    transport.clear()
    return wire, transport


def test_error_replies_are_values_and_the_connection_goes_on() -> None:
    wire, transport = ready_wire()
    first = results(wire.connection.execute(b"a"))
    second = results(wire.connection.execute(b"b"))
    transport.protocol.dataReceived(b"-NOSCRIPT No matching script\r\n:5\r\n")
    assert isinstance(first[0], hiredis.ReplyError) and str(first[0]).startswith("NOSCRIPT")
    assert second == [5] and wire.connection.connected


def test_a_lost_connection_leaves_the_outcome_unknown_and_reconnects() -> None:
    wire, transport = ready_wire()
    sent = results(wire.connection.execute(b"a"))
    wire.reactor.advance(0)  # the turn ends: its commands go
    unsent = results(wire.connection.execute(b"b"))
    transport.loseConnection()
    assert isinstance(sent[0].value, OutcomeUnknown), "a command sent, then the connection lost"
    # Made in the turn the connection was lost: it never went, nothing of it happened.
    assert isinstance(unsent[0].value, BrokerUnavailable), "a command lost before it went"
    assert not isinstance(unsent[0].value, OutcomeUnknown)
    assert not wire.connection.connected
    after = results(wire.connection.execute(b"b"))
    assert isinstance(after[0].value, BrokerUnavailable), "a command made while down"
    wire.reactor.advance(RETRY(1) + 1)
    wire.accept().protocol.dataReceived(b"+PONG\r\n")
    assert wire.connection.connected and wire.ready == 2


def test_the_watchdog_cuts_a_connection_redis_stopped_answering() -> None:
    wire, transport = ready_wire()
    answered = results(wire.connection.execute(b"a"))
    wire.reactor.advance(1.0)
    transport.protocol.dataReceived(b":1\r\n")
    stuck = results(wire.connection.execute(b"b"))
    wire.reactor.advance(1.0)  # first seen
    assert not transport.disconnected, "cut before a whole tick without an answer"
    wire.reactor.advance(1.0)
    assert transport.disconnected, "not cut after two ticks without an answer"
    assert answered == [1] and isinstance(stuck[0].value, OutcomeUnknown)


def test_abandon_cuts_only_a_connection_with_commands_unanswered() -> None:
    wire, transport = ready_wire()
    wire.connection.abandon()
    assert not transport.disconnected
    waiting = results(wire.connection.execute(b"a"))
    wire.reactor.advance(0)
    wire.connection.abandon()
    assert transport.disconnected and isinstance(waiting[0].value, OutcomeUnknown)


@pytest.mark.parametrize("garbage", [b"?what\r\n", b"$-5\r\n"], ids=["unknown type", "bad length"])
def test_what_is_not_resp_cuts_the_connection(garbage: bytes) -> None:
    wire, transport = ready_wire()
    waiting = results(wire.connection.execute(b"a"))
    wire.reactor.advance(0)
    transport.protocol.dataReceived(garbage)
    assert transport.disconnected and isinstance(waiting[0].value, OutcomeUnknown)


def test_a_reply_nothing_asked_for_cuts_the_connection() -> None:
    _, transport = ready_wire()
    transport.protocol.dataReceived(b":1\r\n")
    assert transport.disconnected


REPLIES = st.lists(
    st.one_of(
        st.integers(-(2**63), 2**63 - 1).map(lambda n: (b":%d\r\n" % n, n)),
        st.text(max_size=30).map(lambda t: (b"$%d\r\n%s\r\n" % (len(t.encode()), t.encode()), t)),
        st.just((b"$-1\r\n", None)),
        st.lists(st.integers(0, 9), max_size=3).map(
            lambda ns: (b"*%d\r\n" % len(ns) + b"".join(b":%d\r\n" % n for n in ns), ns)
        ),
    ),
    min_size=1,
    max_size=12,
)


@given(REPLIES, st.lists(st.integers(0, 400), max_size=8))
def test_replies_match_commands_in_order_however_the_reads_cut_them(
    replies: list[tuple[bytes, Any]], cuts: list[int]
) -> None:
    proto = RedisProtocol(clock=MemoryReactorClock())
    transport = StringTransportWithDisconnection()
    transport.protocol = proto
    proto.makeConnection(transport)
    got = [results(proto.execute(b"c")) for _ in replies]
    stream = b"".join(wire for wire, _ in replies)
    start = 0
    for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
        proto.dataReceived(stream[start:cut])
        start = max(start, cut)
    assert [g[0] for g in got] == [value for _, value in replies]
    assert not transport.disconnected


def test_commands_are_byte_identical_to_txredisapis() -> None:
    """pushd moved the hot path from txredisapi's command builder to hiredis's:
    Redis gets the same bytes."""
    import txredisapi

    proto = txredisapi.RedisProtocol(charset="utf-8", convertNumbers=False)
    args = ("EVALSHA", "f" * 40, 2, "k{é}", b"\xff\x00", -7, "")
    assert command(*args) == bytes(proto._build_command(*args))


def test_connection_lost_fails_what_waits_exactly_once() -> None:
    clock = MemoryReactorClock()
    proto = RedisProtocol(clock=clock)
    transport = StringTransportWithDisconnection()
    transport.protocol = proto
    proto.makeConnection(transport)
    waiting = results(proto.execute(b"a"))
    clock.advance(0)
    proto.connectionLost(Failure(ConnectionError("gone")))
    proto.connectionLost(Failure(ConnectionError("again")))
    assert len(waiting) == 1 and isinstance(waiting[0].value, OutcomeUnknown)


def test_the_cached_commands_are_the_commands_hiredis_packs() -> None:
    """The hot path's per-channel templates (publish, /push) around the data
    give exactly the EVALSHA hiredis would pack whole."""
    from twisted.internet.defer import Deferred as D

    from pushd.broker.redis.keys import Keys
    from pushd.broker.redis.publisher import Publisher
    from pushd.broker.redis.scripts import PUBLISH, PUSH

    sent: list[bytes] = []

    class Recording:
        def execute(self, command: bytes) -> D[Any]:
            sent.append(command)
            return D()

    publisher = Publisher(Recording(), Keys("p:"), (100, 3600, 300), 86400)  # type: ignore[arg-type]
    for channel, data in [("news", b'{"x":1}'), ("dm#a,b", '"\u00e9"'.encode()), ("news", b"")]:
        publisher.publish(channel, data)
        args = publisher._publish_args(channel, data, None, "")
        assert sent[-1] == hiredis.pack_command(("EVALSHA", PUBLISH.sha, *args))
        publisher.push(channel, b"S|1|x", "events", data)
        args = publisher._push_args(channel, b"S|1|x", "events", data)
        assert sent[-1] == hiredis.pack_command(("EVALSHA", PUSH.sha, *args))

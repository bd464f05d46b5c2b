"""The command pool (pushd/broker/redis/pool.py) on one txredisapi connection
over a StringTransport: what an error reply leaves behind. The real-Redis
side: tests/test_websocket.py (the cycle collector), test_history_api.py (a
SCRIPT FLUSH)."""

from __future__ import annotations

import gc
import types
from collections.abc import Iterator
from typing import Any

import pytest
from hiredis import pack_command
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport

from pushd.broker import BrokerUnavailable
from pushd.broker.redis.pool import CommandPool, PoolFactory
from pushd.broker.redis.scripts import EPOCH


class Wire:
    """A CommandPool of one txredisapi connection whose far end is the test."""

    def __init__(self, reply_timeout: float | None = None) -> None:
        self.reactor = reactor = MemoryReactorClock()
        factory = PoolFactory(None, None, 1, isLazy=True, convertNumbers=False)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", 1)
        self.pool = CommandPool(reactor, factory, endpoint, reply_timeout or 1.0)
        # Connected by hand: txredisapi's buildProtocol hands a connection to
        # the pool a turn later, on the global reactor.
        self.redis = factory.protocol(
            factory.charset,
            replyTimeout=reply_timeout,
            password=None,
            dbid=None,
            convertNumbers=False,
        )
        self.redis.clock = reactor  # its reply timeouts (PatientTimeout)
        self.redis.factory = factory
        self.transport = StringTransport()
        self.redis.makeConnection(self.transport)
        factory.addConnection(self.redis)

    def sent(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return bytes(data)

    def answer(self, reply: bytes) -> None:
        self.redis.dataReceived(reply)


def results(d: Deferred[Any]) -> list[Any]:
    got: list[Any] = []
    d.addBoth(got.append)
    return got


@pytest.fixture
def no_collections() -> Iterator[None]:
    """No automatic collections in the test: a cycle is found by `left_to_the_collector`.
    Earlier tests' garbage goes first, including what finalizers run by a
    collection leave (an unhandled failed Deferred's log of its Failure)."""
    for _ in range(10):
        if not gc.collect():
            break
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def left_to_the_collector() -> list[str]:
    """The exceptions and frames only the cycle collector would free."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return [
            f"{type(o).__name__} {o!r:.80}"
            for o in gc.garbage
            if isinstance(o, (BaseException, types.FrameType))
        ]
    finally:
        gc.garbage.clear()
        gc.set_debug(0)


def test_a_noscript_loads_the_script_and_leaves_no_cycle(no_collections: None) -> None:
    """txredisapi raises an error reply in a callback whose frames hold it
    (error -> traceback -> frames -> error): the pool lets go of the traceback,
    or every frame under it, down to the reactor's and what their locals
    held (a closed WebSocket's connection), waits for a full collection."""
    wire = Wire()
    evalsha = pack_command(("EVALSHA", EPOCH.sha, 1, "k", "a"))
    ran = results(Deferred.fromCoroutine(wire.pool.run(EPOCH, ["k"], ["a"])))
    assert wire.sent() == evalsha
    wire.answer(b"-NOSCRIPT No matching script. Please use EVAL.\r\n")
    assert wire.sent() == pack_command(("SCRIPT", "LOAD", EPOCH.source))
    wire.answer(b"$40\r\n" + EPOCH.sha.encode() + b"\r\n")
    assert wire.sent() == evalsha
    wire.answer(b":7\r\n")
    assert ran == [7]
    assert left_to_the_collector() == []


def test_an_error_reply_is_broker_unavailable_and_leaves_no_cycle(no_collections: None) -> None:
    wire = Wire()
    got = results(Deferred.fromCoroutine(wire.pool.call("execute_command", "GET", "k")))
    wire.answer(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n")
    assert len(got) == 1
    assert got[0].check(BrokerUnavailable)
    assert "WRONGTYPE" in got[0].getErrorMessage()
    got.clear()
    assert left_to_the_collector() == []


def test_an_answer_read_in_the_pass_after_its_timeout_was_due_is_taken() -> None:
    """The reactor runs due timers before it reads its sockets: after a pass
    longer than the timeout, the answer already in the socket is read in the
    next pass, and the command (and the connection) are kept."""
    wire = Wire(reply_timeout=5.0)
    got = results(Deferred.fromCoroutine(wire.pool.call("execute_command", "PING")))
    wire.reactor.advance(5.0)  # due while the reactor was busy elsewhere
    assert got == []
    wire.answer(b"+PONG\r\n")  # its next pass over the sockets
    wire.reactor.advance(0.001)
    assert got == ["PONG"]
    assert not wire.transport.disconnecting
    assert wire.reactor.getDelayedCalls() == []


def test_no_answer_after_that_pass_times_out_and_drops_the_connection() -> None:
    wire = Wire(reply_timeout=5.0)
    got = results(Deferred.fromCoroutine(wire.pool.call("execute_command", "PING")))
    queued = results(Deferred.fromCoroutine(wire.pool.call("execute_command", "PING")))
    wire.reactor.advance(5.0)
    assert got == []
    wire.reactor.advance(0.001)
    assert got[0].check(BrokerUnavailable) and queued[0].check(BrokerUnavailable)
    # Its answers would now come out of order: txredisapi drops it.
    assert wire.transport.disconnecting

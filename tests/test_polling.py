"""The epoll reactor's poll without the legacy log context (pushd.polling):
sockets are served on a real reactor, and an exception out of one socket's
handling is logged while the others are still served. (That Twisted's loop is
still the one it copies: tests/test_canaries.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from twisted.internet import protocol
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher

from pushd import polling


class _Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class _Client(protocol.Protocol):
    """Sends `hello`, keeps what comes back; `explode` makes its connectionLost raise."""

    def __init__(self, got: list[bytes], explode: bool) -> None:
        self.got = got
        self.explode = explode

    def connectionMade(self) -> None:
        self.transport.write(b"hello")

    def dataReceived(self, data: bytes) -> None:
        self.got.append(data)
        if self.explode:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self.explode:
            raise RuntimeError("connectionLost raised")


def _connect(reactor: EPollReactor, port: int, explode: bool) -> list[bytes]:
    """A _Client connected to `port`; what it gets back."""
    got: list[bytes] = []
    factory = protocol.ClientFactory.forProtocol(lambda: _Client(got, explode))
    reactor.connectTCP("127.0.0.1", port, factory)
    return got


def _run_until(reactor: EPollReactor, done: Any, turns: int = 500) -> None:
    for _ in range(turns):
        if done():
            return
        reactor.iterate(0.05)
    raise AssertionError("the reactor never got there")


def test_sockets_are_served_and_a_raising_one_is_logged_and_passed() -> None:
    reactor = EPollReactor()
    assert polling.dispatch_directly(reactor)
    assert reactor.doIteration.__func__ is polling._do_poll  # type: ignore[attr-defined]
    failures: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(_Echo), interface="127.0.0.1")
        address = port.getHost()
        first = _connect(reactor, address.port, explode=True)
        _run_until(reactor, lambda: failures)
        assert first == [b"hello"]
        (event,) = failures
        assert event["log_failure"].check(RuntimeError)
        assert "handling an event of" in event["log_format"]
        # The loop went on: another connection is served.
        second = _connect(reactor, address.port, explode=False)
        _run_until(reactor, lambda: second)
        assert second == [b"hello"]
        port.stopListening()
    finally:
        globalLogPublisher.removeObserver(observe)
        reactor.disconnectAll()
        reactor._poller.close()


def test_other_reactors_are_left_as_they_are() -> None:
    clock = Clock()
    assert not polling.dispatch_directly(clock)
    assert not hasattr(clock, "doIteration")
    select = SelectReactor()
    assert not polling.dispatch_directly(select)
    assert select.doIteration == select.doSelect


_PROBE = """
import json
from twisted.internet import reactor
from pushd import polling
from pushd.tap import Options, makeService
options = Options()
options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1"])
makeService(options)
print(json.dumps({
    "reactor": type(reactor).__name__,
    "direct": getattr(reactor.doIteration, "__func__", None) is polling._do_poll,
}))
"""


def test_twistd_pushd_polls_directly() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"reactor": "EPollReactor", "direct": True}

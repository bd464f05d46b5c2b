"""Canaries: one test per library internal pushd relies on (issue 15, point 5).

Each test checks one private (or undocumented) name of Twisted, Autobahn,
txredisapi or the stdlib's json module on a fresh object, with the type and the
behaviour pushd relies on, and fails with a message naming the library and its
version. When one fails after an upgrade, the entry below says which pushd code to
look at before lifting the pin in setup.cfg.

Internal (library): pushd's use -> what it relies on

- `HTTPChannel._HTTPChannel__first_line` (Twisted): web/channel.py (PushdChannel.lineReceived,
    dataReceived)
    -> truthy while the next line is a request line (between requests), falsy once one was read;
       1 after a request (one blank line may come before the next), 2 once it came: pushd
       sets 1 after a request its hot path took
- `LineReceiver._buffer`, `line_mode` (Twisted): web/channel.py (PushdChannel.dataReceived)
    -> bytes of a partial line wait in `_buffer`; `line_mode` is true while lines are read
- `HTTPChannel._handlingRequest` (Twisted): web/channel.py (requestDone)
    -> True from a request's headers to its `requestDone`, False between requests
- `HTTPChannel._networkProducer` (Twisted): web/channel.py (_close_gently, _network)
    -> the transport (an IPushProducer with unregisterProducer), set in connectionMade
- `HTTPChannel._waitingForTransport` (Twisted): web/channel.py (_fast_answer)
    -> bool, set by `pauseProducing` while the transport's buffer is full
- `HTTPChannel._send100Continue` (Twisted): web/channel.py (PushdChannel._send100Continue)
    -> called for `Expect: 100-continue` after `gotLength`, with the request last in `requests`
- `HTTPChannel._respondToBadRequestAndDisconnect` (Twisted): web/channel.py
    (PushdChannel._respondToBadRequestAndDisconnect)
    -> the one hook for every 400 twisted.web answers itself
- `Request._disconnected` (Twisted): web/channel.py, transports/stream.py
    -> False while the connection is up, True once it was lost
- `server.Request._handleStar` (Twisted): web/channel.py (PushdRequest._handleStar)
    -> called by `process()` for a request target of `*`
- names pushd adds to Twisted's classes (Twisted): web/channel.py (PushdChannel, PushdRequest)
    -> no pushd attribute shadows one Twisted adds in a release
- `endpoints._parseServer` (Twisted): config.py (_endpoint), workers.py (open_socket)
    -> `(description, factory) -> (kind, args, kwargs)`; ValueError for a bad one
- `EPollReactor.doPoll`, `._doReadOrWrite(selectable, fd, event)`, `._poller`,
    `._selectables` (Twisted): polling.py (_do_poll, dispatch_directly)
    -> the loop polling.py copies but for `log.callWithLogger`; `doIteration` is `doPoll`
- `tcp.Server`, `tcp.Client`, `.dataBuffer`, `._tempDataBuffer`, `.TLS`, `.socket` (Twisted):
    sending.py (write_now, unsent)
    -> the accepted TCP transport's class; both buffers empty (falsy) when nothing waits
- `WebSocketServerProtocol.CONFIG_ATTRS`, copy in `_connectionMade` (Autobahn):
    transports/autobahn_diet.py (options_on_class)
    -> options set on the protocol class are read from it: Autobahn copies only what a
       connection lacks, and only the names the class lists (read nowhere else)
- `WebSocketProtocol.sendData(data, sync, chopsize)` (Autobahn): transports/websocket.py
    (PushdServerProtocol.sendData)
    -> every write of Autobahn's (the handshake's answer, close, ping and pong frames) goes
       through it, plain ones to `transport.write`
- `WebSocketProtocol.sendPong(payload)`, `dropConnection(abort)` (Autobahn):
    transports/websocket.py (PushdServerProtocol.sendPong, dropConnection)
    -> a client's ping is answered through `sendPong`; every drop (the close handshake's end,
       a violation, a timeout) goes through `dropConnection`, `abort=True` after the server
       got the client's close frame
- `WebSocketServerFactory.reactor` (Autobahn): transports/websocket.py
    (_admitted: `factory.reactor`)
    -> the reactor given to the factory, kept as `.reactor`
- `WebSocketServerFactory._batched_timer`, txaio's `_BatchedTimer(bucket_ms, chunk,
    seconds_provider=, delayed_call_creator=)` (Autobahn, txaio): transports/websocket.py
    (PushdServerFactory) -> the protocol's timers go through the factory's `_batched_timer`
- `http_headers`, `http_request_*`, `websocket_*`, `_wskey` (Autobahn):
    transports/autobahn_diet.py (_HANDSHAKE_ONLY, shrink)
    -> set on the connection by the handshake, never read once it is open
- `__dict__` of an open connection, `state` (Autobahn):
    transports/autobahn_diet.py (shrink)
    -> a plain instance dict that may be replaced, plain values read through the class
- `send_queue` (Autobahn): transports/autobahn_diet.py (shrink)
    -> appended to only for sync or chopsize writes: an empty tuple in its place is never
       touched
- `is_closed`, `is_open` (Autobahn): transports/autobahn_diet.py (drop_cycles, shrink)
    -> instance attributes (futures) made per connection, `is_closed` resolved with the protocol;
       resolved through txaio.resolve/reject, which call `callback`/`errback` (shrink swaps them
       for one shared future), `is_open` after onOpen
- `trafficStats` (Autobahn): transports/autobahn_diet.py (shrink)
    -> per connection, only added to (never read for behaviour): shared by a factory's connections
- frames written straight to the transport (Autobahn): transports/websocket.py
    (message, _reply, text_frame)
    -> `sendMessage` writes exactly `text_frame(payload)` (no compression unless negotiated)
- `sendCloseFrame(code, reasonUtf8)` (Autobahn): transports/websocket.py (close_all)
    -> writes a close frame with a code `sendClose` refuses (1001)
- names pushd adds to Autobahn's protocol (Autobahn):
    transports/websocket.py (PushdServerProtocol)
    -> no pushd attribute shadows one Autobahn adds (`_paused`, `message`, ...)
- `WebSocketResource.render` (Autobahn + Twisted): transports/websocket.py
    (WebSocketEndpoint.render, onOpen)
    -> detaches the channel (`channel.transport is None`), leaves it the transport's producer
- `RedisFactory.size`, `handler`, `deferred` (txredisapi): broker/redis/pool.py (CommandPool)
    -> connections made count in `size`; `handler` runs commands on them; `deferred` fires
       once all `poolsize` are made
- `RedisFactory.initialDelay`, `factor`, `maxDelay` (txredisapi): broker/redis/pool.py
    (retry_alike) -> what `retryDelay(attempt)`, the reconnect delay, is made of
- `BaseRedisProtocol.connectionMade` calling `factory.stopTrying()` (txredisapi):
    broker/redis/pool.py (KeepTrying) -> AUTH/SELECT failing at a connection's start
- `SentinelConnectionFactory(sentinel_manager, service_name, is_master, uuid, dbid,
    poolsize, ...)` (txredisapi): broker/redis/shard.py (Shard, with Sentinel)
    -> a RedisFactory whose connections check the server's role
- `_PoolSlot(factory, endpoint, reconnect)`, its `.service`, `_retryDelay`,
    `_prepareConnection`, `_SlotFactory(factory, slot)`, `RedisFactory.startConnecting`,
    `addConnection`, `delConnection` (txredisapi): broker/redis/reachability.py (QuietSlots,
    _QuietSlot), broker/redis/pool.py (_Told)
    -> `startConnecting` makes `poolsize` slots and starts them; a slot connects through the
       ClientService in `.service`, made of those arguments; `add`/`delConnection` count `size`
- `BaseRedisProtocol.connectionMade` calling `factory.connectionError("Redis error: could
    not auth: ...")` (txredisapi): broker/redis/pool.py (KeepTrying.connectionError)
    -> a refused AUTH or SELECT is told the factory, in those words
- `LineReceiver.callLater`, the reply timeout `self.callLater(self.replyTimeout, ...)` and its
    `active()`/`cancel()` (txredisapi): broker/redis/pool.py (PatientTimeout, _Patient)
    -> each command's reply timeout is scheduled through the protocol's `callLater`
- `ClientService._log` (Twisted): broker/redis/reachability.py (QuietClientService)
    -> the Logger ClientService hands its state machine, which logs every retry through it
- `SubscriberFactory.charset`, `.convertNumbers`, `messageReceived` (txredisapi):
    broker/redis/subscriber.py (_ConnectionFactory, _Connection)
    -> read at buildProtocol; `messageReceived(pattern, channel, message)` per message
- `json.encoder.c_make_encoder`, `c_encode_basestring(_ascii)` (CPython): message.py (_encoder)
    -> 9 positional arguments; `allow_nan=False` refuses NaN; yields str chunks
- `JSONDecoder.scan_once` (CPython): message.py (_load_exact)
    -> `(text, idx) -> (value, end)`; StopIteration when no value starts there

txredisapi is imported inside the tests: importing it installs the default
reactor (tests/conftest.py).
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import math
import os
import socket
import struct
import sys
from importlib.metadata import version
from typing import Any

import pytest
from twisted.internet import endpoints, tcp
from twisted.internet.defer import Deferred
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

TWISTED = f"Twisted {version('twisted')}"
AUTOBAHN = f"autobahn {version('autobahn')}"
TXREDISAPI = f"txredisapi {version('txredisapi')}"
PYTHON = f"Python {sys.version.split()[0]}"


def _changed(library: str, what: str) -> str:
    return f"{library}: {what} (a pushd internal; see the list in tests/test_canaries.py)"


def _present(library: str, owner: Any, *names: str) -> None:
    """Each name is still there: a rename fails here, by name, not deep in a test."""
    where = getattr(owner, "__name__", type(owner).__name__)
    gone = [n for n in names if not hasattr(owner, n)]
    assert not gone, _changed(library, f"{where} has no {', '.join(gone)}")


# -- Twisted: twisted.web's HTTPChannel and Request


def _channel(request_factory: Any = http.Request) -> tuple[http.HTTPChannel, StringTransport]:
    channel = http.HTTPChannel()
    channel.requestFactory = request_factory
    channel.callLater = MemoryReactorClock().callLater  # type: ignore[method-assign,assignment]
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def test_httpchannel_first_line() -> None:
    channel, _ = _channel()
    what = _changed(TWISTED, "HTTPChannel._HTTPChannel__first_line")
    assert hasattr(channel, "_HTTPChannel__first_line"), what + " is gone"
    assert channel._HTTPChannel__first_line == 1, what + " is not 1 before a request"
    channel.dataReceived(b"\r\n")
    assert channel._HTTPChannel__first_line == 2, what + " is not 2 after a blank line"
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    assert not channel._HTTPChannel__first_line, what + " stays truthy after a request line"
    channel.dataReceived(b"Host: x\r\n\r\n")
    assert channel._HTTPChannel__first_line == 1, what + " is not 1 again after a request"


def test_linereceiver_buffer_and_line_mode() -> None:
    channel, _ = _channel()
    _present(TWISTED, channel, "_buffer", "line_mode")
    what = _changed(TWISTED, "LineReceiver._buffer / line_mode")
    assert channel._buffer == b"" and channel.line_mode, what + " on a fresh channel"
    channel.dataReceived(b"GET / HT")
    assert channel._buffer == b"GET / HT", what + ": a partial line is not in _buffer"
    channel.dataReceived(b"TP/1.1\r\nHost: x\r\ncontent-length: 3\r\n\r\n")
    assert channel._buffer == b"" and not channel.line_mode, what + ": not in raw mode for a body"


def test_httpchannel_handling_request() -> None:
    channel, _ = _channel()
    _present(TWISTED, channel, "_handlingRequest")
    what = _changed(TWISTED, "HTTPChannel._handlingRequest")
    assert channel._handlingRequest is False, what + " is not False on a fresh channel"
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert channel._handlingRequest is True, what + " is not True while a request is handled"
    channel.requests[0].finish()
    assert channel._handlingRequest is False, what + " is not False after requestDone"


def test_httpchannel_network_producer() -> None:
    channel, transport = _channel()
    _present(TWISTED, channel, "_networkProducer")
    what = _changed(TWISTED, "HTTPChannel._networkProducer")
    assert channel._networkProducer is transport, what + " is not the transport"
    assert transport.producer is channel, what + ": the channel is not the transport's producer"
    channel._networkProducer.unregisterProducer()
    assert transport.producer is None, what + ".unregisterProducer() did not unregister"


def test_httpchannel_waiting_for_transport() -> None:
    channel, _ = _channel()
    _present(TWISTED, channel, "_waitingForTransport")
    what = _changed(TWISTED, "HTTPChannel._waitingForTransport")
    assert channel._waitingForTransport is False, what + " is not False on a fresh channel"
    channel.pauseProducing()
    assert channel._waitingForTransport is True, what + " is not set by pauseProducing"
    channel.resumeProducing()
    assert channel._waitingForTransport is False, what + " is not cleared by resumeProducing"


def test_httpchannel_send_100_continue() -> None:
    _present(TWISTED, http.HTTPChannel, "_send100Continue")
    seen: list[Any] = []

    class Request(http.Request):
        def gotLength(self, length: int | None) -> None:
            seen.append(("gotLength", length))
            super().gotLength(length)

    class Channel(http.HTTPChannel):
        def _send100Continue(self) -> None:
            seen.append(("100", self.requests[-1]))

    channel = Channel()
    channel.callLater = MemoryReactorClock().callLater  # type: ignore[method-assign,assignment]
    channel.requestFactory = Request
    channel.makeConnection(StringTransport())
    channel.dataReceived(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    what = _changed(TWISTED, "HTTPChannel._send100Continue")
    assert ("100", channel.requests[-1]) in seen, what + " is not called for Expect: 100-continue"
    assert seen == [("gotLength", 5), ("100", channel.requests[-1])], (
        what + " comes before gotLength"
    )


def test_httpchannel_respond_to_bad_request() -> None:
    _present(TWISTED, http.HTTPChannel, "_respondToBadRequestAndDisconnect")
    bad: list[bytes] = []

    class Channel(http.HTTPChannel):
        def _respondToBadRequestAndDisconnect(self) -> None:
            bad.append(b"")

    what = _changed(TWISTED, "HTTPChannel._respondToBadRequestAndDisconnect")
    for data in (
        b"GARBAGE\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
    ):
        channel = Channel()
        channel.callLater = MemoryReactorClock().callLater  # type: ignore[method-assign,assignment]
        channel.requestFactory = http.Request
        channel.makeConnection(StringTransport())
        bad.clear()
        channel.dataReceived(data)
        assert bad, what + f" is not called for {data!r}"


def test_request_disconnected() -> None:
    channel, _ = _channel()
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    request = channel.requests[0]
    _present(TWISTED, request, "_disconnected")
    what = _changed(TWISTED, "Request._disconnected")
    assert request._disconnected is False, what + " is not False while connected"
    channel.connectionLost(Failure(ConnectionError("gone")))
    assert request._disconnected is True, what + " is not True once the connection is lost"


def test_request_handle_star() -> None:
    _present(TWISTED, server.Request, "_handleStar")
    seen: list[bytes] = []

    class Request(server.Request):
        def _handleStar(self) -> None:
            seen.append(self.method)
            self.finish()

    channel, _ = _channel(Request)
    channel.site = server.Site(Resource())  # type: ignore[attr-defined]
    channel.dataReceived(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
    assert seen == [b"OPTIONS"], _changed(TWISTED, "server.Request._handleStar is not called for *")


def test_no_pushd_name_shadows_twisted() -> None:
    from pushd.web.channel import PushdChannel, PushdRequest

    channel, _ = _channel()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
    live_channel = set(dir(channel))
    channel.site = server.Site(Resource())  # type: ignore[attr-defined]
    live_request = set(dir(server.Request(channel)))
    assert _overlap(PushdChannel, live_channel) == {
        "_respondToBadRequestAndDisconnect",
        "_send100Continue",
        "allContentReceived",
        "allHeadersReceived",
        "checkPersistence",
        "connectionLost",
        "connectionMade",
        "dataReceived",
        "lineLengthExceeded",
        "lineReceived",
        "loseConnection",
        "maxHeaders",
        "rawDataReceived",
        "requestDone",
        "writeHeaders",
    }, _changed(
        TWISTED,
        "HTTPChannel gained or lost a name PushdChannel defines"
        " (if pushd added the override on purpose, list it here)",
    )
    assert _overlap(PushdRequest, live_request) == {
        "_handleStar",
        "gotLength",
        "handleContentChunk",
        "process",
        "processingFailed",
        "render",
    }, _changed(
        TWISTED,
        "server.Request gained or lost a name PushdRequest defines"
        " (if pushd added the override on purpose, list it here)",
    )


def _overlap(cls: type, library_names: set[str]) -> set[str]:
    """The names pushd's classes in `cls`'s MRO define that the library also has."""
    own: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith("pushd"):
            own |= {n for n in vars(klass) if not n.startswith("__")}
            own |= set(getattr(klass, "__slots__", ()))
    return own & library_names


# -- Twisted: endpoints and the TCP transport


def test_endpoints_parse_server() -> None:
    _present(TWISTED, endpoints, "_parseServer")
    what = _changed(TWISTED, "endpoints._parseServer(description, factory)")
    assert endpoints._parseServer("tcp:8080:interface=127.0.0.1:backlog=1024", None) == (
        "TCP",
        (8080, None),
        {"interface": "127.0.0.1", "backlog": 1024},
    ), what + " for tcp:"
    kind, args, kwargs = endpoints._parseServer("unix:/tmp/pushd.sock:backlog=5", None)
    assert (kind, args[0], kwargs["backlog"]) == ("UNIX", "/tmp/pushd.sock", 5), what + " for unix:"
    for bad in ("bogus:1", "tcp:notaport"):
        with pytest.raises(ValueError):
            endpoints._parseServer(bad, None)


# Twisted 26.10's EPollReactor.doPoll, which polling.py copies but for its call
# through log.callWithLogger: a Twisted that changed it fails here.
DO_POLL_SHA256 = "09b62ae68ef01b4bc5eaa170827e2baf0a2a5098e7e7ce7b5e1c80cda187c827"


def test_epoll_reactor_do_poll() -> None:
    what = _changed(TWISTED, "EPollReactor.doPoll / _doReadOrWrite")
    source = inspect.getsource(EPollReactor.doPoll)
    assert hashlib.sha256(source.encode()).hexdigest() == DO_POLL_SHA256, what + ":\n" + source
    assert "log.callWithLogger(selectable, _drdw, selectable, fd, event)" in source, what
    parameters = list(inspect.signature(EPollReactor._doReadOrWrite).parameters)
    assert parameters == ["self", "selectable", "fd", "event"], what
    assert EPollReactor.doIteration is EPollReactor.doPoll, what
    reactor = EPollReactor()
    try:
        assert isinstance(reactor._selectables, dict), what
        assert callable(reactor._poller.poll), what
    finally:
        reactor._poller.close()


def test_tcp_server_buffers() -> None:
    what = _changed(TWISTED, "tcp.Server dataBuffer/_tempDataBuffer/TLS/socket")
    _present(TWISTED, tcp.Server, "dataBuffer", "TLS")
    assert tcp.Port.transport is tcp.Server, what + ": accepted connections are not tcp.Server"
    # Connections pushd makes (to Redis) share the same buffers (tcp.Connection's).
    assert issubclass(tcp.Client, tcp.Connection) and issubclass(tcp.Server, tcp.Connection), what
    made = inspect.getsource(tcp.Connector._makeTransport)
    assert "return Client(" in made, what + ": connectTCP makes no tcp.Client"
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        transport = tcp.Server(ours, None, ("127.0.0.1", 1), None, 0, MemoryReactorClock())  # type: ignore[arg-type]
        _present(TWISTED, transport, "socket", "_tempDataBuffer", "connected")
        assert transport.socket is ours, what
        assert transport.TLS is False and transport.connected, what
        assert not transport.dataBuffer and transport._tempDataBuffer == [], what + " when fresh"
        transport.write(b"abc")
        assert transport.dataBuffer or transport._tempDataBuffer, what + ": a write is not buffered"
        transport.doWrite()
        assert theirs.recv(3) == b"abc", what + ": doWrite did not send"
        assert not transport.dataBuffer and not transport._tempDataBuffer, (
            what + " once all is sent"
        )
    finally:
        ours.close()
        theirs.close()


# -- Autobahn


def _ws_factory(protocol: type | None = None) -> Any:
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

    factory = WebSocketServerFactory(reactor=MemoryReactorClock())
    factory.protocol = protocol or WebSocketServerProtocol  # type: ignore[assignment]
    # No timers: nothing is left on a reactor.
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0, autoPingInterval=0)
    return factory


_HANDSHAKE = (
    b"GET /ws?channel=a HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
)


def _open_ws(protocol: type | None = None) -> tuple[Any, StringTransport]:
    p = _ws_factory(protocol).buildProtocol(None)
    transport = StringTransport()
    p.makeConnection(transport)
    p.dataReceived(_HANDSHAKE + base64.b64encode(os.urandom(16)) + b"\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 101 "), _changed(AUTOBAHN, "no handshake")
    transport.clear()
    return p, transport


def _client_frame(opcode: int, payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked


def test_autobahn_config_attrs_read_from_the_class() -> None:
    from autobahn.twisted.websocket import WebSocketServerProtocol

    class Protocol(WebSocketServerProtocol):
        maxMessagePayloadSize = 1234

    _present(AUTOBAHN, Protocol, "CONFIG_ATTRS", "STATE_OPEN")
    factory = _ws_factory(Protocol)
    what = _changed(AUTOBAHN, "WebSocketServerProtocol.CONFIG_ATTRS")
    assert "maxMessagePayloadSize" in Protocol.CONFIG_ATTRS, what + " lacks an option pushd sets"
    assert all(hasattr(factory, name) for name in Protocol.CONFIG_ATTRS), what + ": not on factory"
    p = factory.buildProtocol(None)
    p.makeConnection(StringTransport())
    assert p.maxMessagePayloadSize == 1234, what + ": the factory's value overrode the class's"
    assert "maxMessagePayloadSize" not in p.__dict__, what + ": copied to every connection"
    assert "autoPingInterval" in p.__dict__, what + ": options lacking are no longer copied"
    # options_on_class empties the list: a connection then copies nothing and
    # reads every option from the class (the list is read nowhere else).
    import inspect

    from autobahn.websocket import protocol

    assert inspect.getsource(protocol).count(".CONFIG_ATTRS:") == 1, what + ": read elsewhere"
    from pushd.transports.autobahn_diet import options_on_class

    factory.maxMessagePayloadSize = 4321
    options_on_class(factory)
    assert Protocol.CONFIG_ATTRS == []
    p = factory.buildProtocol(None)
    p.makeConnection(StringTransport())
    assert p.maxMessagePayloadSize == 4321, what + ": an empty list broke the connect"
    assert "autoPingInterval" not in p.__dict__, what + ": copied though not listed"


def test_autobahn_factory_reactor() -> None:
    from autobahn.twisted.websocket import WebSocketServerFactory

    clock = MemoryReactorClock()
    factory = WebSocketServerFactory(reactor=clock)
    assert factory.reactor is clock, _changed(AUTOBAHN, "WebSocketServerFactory(reactor=).reactor")


def test_autobahn_batched_timer_on_the_factorys_reactor() -> None:
    """PushdServerFactory puts Autobahn's timers on its own reactor: a ping
    timeout then runs on a test's Clock."""
    from autobahn.twisted.websocket import WebSocketServerFactory
    from txaio._common import _BatchedTimer

    what = _changed(AUTOBAHN, "WebSocketServerFactory._batched_timer / txaio _BatchedTimer")
    factory = WebSocketServerFactory(reactor=MemoryReactorClock())
    _present(AUTOBAHN, factory, "_batched_timer")
    assert isinstance(factory._batched_timer, _BatchedTimer), what
    clock = MemoryReactorClock()
    timer = _BatchedTimer(
        200.0, 1000, seconds_provider=clock.seconds, delayed_call_creator=clock.callLater
    )
    fired: list[int] = []
    timer.call_later(1.0, fired.append, 1)
    clock.advance(0.9)
    assert fired == [], what + ": fired early"
    clock.advance(0.4)
    assert fired == [1], what + ": not on the given clock"
    import inspect

    from autobahn.websocket import protocol

    source = inspect.getsource(protocol)
    assert source.count("self.factory._batched_timer.call_later(") >= 5, what + ": not used"


def test_autobahn_handshake_only_attributes() -> None:
    from pushd.transports.autobahn_diet import _HANDSHAKE_ONLY

    p, _ = _open_ws()
    # websocket_key is the client side's name; the server never sets it.
    missing = [n for n in _HANDSHAKE_ONLY if n != "websocket_key" and n not in p.__dict__]
    assert not missing, _changed(AUTOBAHN, f"the handshake no longer sets {missing}")


def test_autobahn_open_connection_survives_shrink() -> None:
    """What autobahn_diet.shrink does to an open connection: no handshake
    attributes, a fresh smaller dict, plain values read through the class."""
    from autobahn.twisted.websocket import WebSocketServerProtocol

    from pushd.transports.autobahn_diet import _HANDSHAKE_ONLY, _SHAREABLE

    got: list[bytes] = []

    class Protocol(WebSocketServerProtocol):
        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            got.append(payload)

    p, transport = _open_ws(Protocol)
    transport.registerProducer(p, True)  # as PushdServerProtocol.onOpen does
    what = _changed(AUTOBAHN, "an open connection")
    assert p.state == Protocol.STATE_OPEN == 3, what + ": state/STATE_OPEN changed"
    own = p.__dict__
    for name in _HANDSHAKE_ONLY:
        own.pop(name, None)
    for name, value in list(own.items()):
        if type(value) in _SHAREABLE and name != "state" and not hasattr(Protocol, name):
            setattr(Protocol, name, value)
            del own[name]
    p.__dict__ = dict(own)
    p.dataReceived(_client_frame(0x1, b"hello"))
    assert got == [b"hello"], what + " reads what pushd drops (autobahn_diet.shrink)"
    p.sendMessage(b"back")
    assert transport.value() == b"\x81\x04back", what + " cannot send once shrunk"
    transport.clear()
    p.dataReceived(_client_frame(0x8, struct.pack("!H", 1000)))
    assert transport.value().startswith(b"\x88"), what + " cannot close once shrunk"


def test_autobahn_send_queue() -> None:
    from pushd.transports.websocket import text_frame

    p, transport = _open_ws()
    what = _changed(AUTOBAHN, "send_queue")
    assert len(p.__dict__.get("send_queue", (1,))) == 0, (
        what + " is not an empty per-connection queue"
    )
    p.send_queue = ()
    p.sendMessage(b"x" * 300)
    assert transport.value() == text_frame(b"x" * 300), what + " is touched by a plain write"


def test_autobahn_is_closed_is_open() -> None:
    p = _ws_factory().buildProtocol(None)
    what = _changed(AUTOBAHN, "is_closed/is_open")
    assert isinstance(p.__dict__.get("is_closed"), Deferred), what + " is not per connection"
    assert isinstance(p.__dict__.get("is_open"), Deferred), what + " is not per connection"
    p.makeConnection(StringTransport())
    p.connectionLost(Failure(ConnectionError("gone")))
    seen: list[Any] = []
    p.is_closed.addCallback(seen.append)
    assert seen == [p], what + ": is_closed is not resolved with the protocol (the cycle)"


def test_txaio_resolves_with_callback_and_autobahn_only_adds_to_traffic_stats() -> None:
    import inspect

    import txaio
    from autobahn.websocket import protocol as ws_protocol

    class Future:
        got: list[Any] = []

        def callback(self, result: object = None) -> None:
            self.got.append(("callback", result))

        def errback(self, failure: object = None) -> None:
            self.got.append(("errback", failure))

    future = Future()
    txaio.resolve(future, 1)
    txaio.reject(future, ValueError("x"))
    what = _changed(AUTOBAHN, "txaio.resolve/reject or trafficStats")
    assert [kind for kind, _ in future.got] == ["callback", "errback"], what
    source = inspect.getsource(ws_protocol)
    reads = [
        line.strip()
        for line in source.splitlines()
        if "trafficStats" in line
        and "+=" not in line
        and "self.trafficStats = TrafficStats()" not in line
    ]
    assert reads == [], what + f": trafficStats read for more than counting: {reads}"


def test_autobahn_frames_equal_text_frame() -> None:
    from pushd.transports.websocket import text_frame

    p, transport = _open_ws()
    for size in (0, 125, 126, 65535, 65536):
        payload = b"a" * size
        p.sendMessage(payload)
        assert transport.value() == text_frame(payload), _changed(
            AUTOBAHN, f"sendMessage no longer writes text_frame() for {size} bytes"
        )
        transport.clear()


def test_autobahn_send_close_frame() -> None:
    p, transport = _open_ws()
    _present(AUTOBAHN, p, "sendCloseFrame")
    p.sendCloseFrame(1001, b"server shutting down")
    expected = b"\x88\x16" + struct.pack("!H", 1001) + b"server shutting down"
    assert transport.value() == expected, _changed(AUTOBAHN, "sendCloseFrame(code, reasonUtf8)")


def test_autobahn_writes_through_send_data() -> None:
    p, transport = _open_ws()
    _present(AUTOBAHN, p, "sendData", "sendPing", "sendPong", "sendClose")
    sent: list[bytes] = []
    p.sendData = lambda data, sync=False, chopsize=None: sent.append(data)
    p.sendPing(b"a")
    p.sendPong(b"b")
    p.sendClose(4000, "c")
    assert sent == [b"\x89\x01a", b"\x8a\x01b", b"\x88\x03\x0f\xa0c"], _changed(
        AUTOBAHN, "ping, pong and close frames no longer go through sendData"
    )
    assert transport.value() == b"", _changed(AUTOBAHN, "a frame was written past sendData")


def test_autobahn_pongs_and_drops_through_their_methods() -> None:
    p, _ = _open_ws()
    pongs: list[bytes | None] = []
    drops: list[bool] = []
    p.sendPong = pongs.append
    p.dropConnection = lambda abort=False: drops.append(abort)
    p.dataReceived(_client_frame(0x9, b"hi"))
    assert pongs == [b"hi"], _changed(AUTOBAHN, "a client's ping is not answered by sendPong")
    p.sendClose(1000)
    p.dataReceived(_client_frame(0x8, struct.pack("!H", 1000)))
    assert drops == [True], _changed(
        AUTOBAHN, "the close handshake's end does not call dropConnection(abort=True)"
    )


def test_no_pushd_name_shadows_autobahn() -> None:
    from pushd.transports.websocket import PushdServerProtocol

    p, _ = _open_ws()
    assert _overlap(PushdServerProtocol, set(dir(p))) == {
        "connectionLost",
        "onClose",
        "onConnect",
        "onMessage",
        "onOpen",
        "sendData",
        "sendPong",
        "dropConnection",
    }, _changed(
        AUTOBAHN,
        "WebSocketServerProtocol gained or lost a name PushdServerProtocol defines"
        " (if pushd added the override on purpose, list it here)",
    )


def test_websocket_resource_detaches_the_channel() -> None:
    from autobahn.twisted.resource import WebSocketResource

    root = Resource()
    root.putChild(b"ws", WebSocketResource(_ws_factory()))  # type: ignore[arg-type]
    channel, transport = _channel(server.Request)
    channel.site = server.Site(root)  # type: ignore[attr-defined]
    transport.protocol = channel  # type: ignore[attr-defined]  # as a TCP transport has
    channel.dataReceived(
        _HANDSHAKE.replace(b"/ws?channel=a", b"/ws") + b"dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    what = _changed(f"{AUTOBAHN} + {TWISTED}", "WebSocketResource.render")
    assert transport.value().startswith(b"HTTP/1.1 101 "), what + " did not upgrade"
    assert channel.transport is None, what + " no longer detaches the HTTP channel"
    assert transport.producer is channel, what + ": the channel is no longer the producer"
    transport.unregisterProducer()  # what PushdServerProtocol.onOpen does, then registers itself


# -- txredisapi


@pytest.fixture
def txredisapi() -> Any:
    import txredisapi

    return txredisapi


def _redis_conn(txredisapi: Any, protocol: type | None = None) -> tuple[Any, StringTransport]:
    conn = (protocol or txredisapi.RedisProtocol)(charset="utf-8", convertNumbers=False)
    transport = StringTransport()
    conn.makeConnection(transport)  # no password, no db: ready at once
    return conn, transport


def test_txredisapi_factory(txredisapi: Any) -> None:
    what = _changed(TXREDISAPI, "RedisFactory.size / handler / deferred")
    factory = txredisapi.RedisFactory(None, None, 1, isLazy=True, convertNumbers=False)
    _present(TXREDISAPI, factory, "size", "handler", "deferred")
    assert factory.size == 0, what + " on a fresh factory"
    whole = factory.deferred
    conn, transport = _redis_conn(txredisapi)
    conn.factory = factory
    factory.addConnection(conn)
    assert factory.size == 1, what + ": a connection made does not count"
    assert whole.called, what + ": deferred does not fire once the pool is connected"
    replies: list[Any] = []
    factory.handler.ping().addCallback(replies.append)
    assert transport.value() == b"*1\r\n$4\r\nPING\r\n", what + ": the handle did not use it"
    conn.dataReceived(b"+PONG\r\n")
    assert replies == ["PONG"], what


def test_txredisapi_reply_timeout_through_the_protocols_call_later(txredisapi: Any) -> None:
    """The pool's PatientTimeout replaces txredisapi's reply timeout through
    the protocol's `callLater`: a command's timeout goes through it, and is
    cancelled through `active()`/`cancel()` once answered."""
    from twisted.internet.task import Clock

    from pushd.broker.redis.pool import PoolProtocol

    what = _changed(TXREDISAPI, "BaseRedisProtocol: replyTimeout through self.callLater")
    _present(TXREDISAPI, txredisapi.LineReceiver, "callLater")
    conn = PoolProtocol(charset="utf-8", convertNumbers=False, replyTimeout=5)
    conn.clock = clock = Clock()
    conn.makeConnection(StringTransport())
    replies: list[Any] = []
    conn.execute_command("PING").addBoth(replies.append)
    timers = clock.getDelayedCalls()
    assert len(timers) == 1 and timers[0].getTime() == 5, what + ": not scheduled through it"
    conn.dataReceived(b"+PONG\r\n")
    assert replies == ["PONG"], what
    assert clock.getDelayedCalls() == [], what + ": not cancelled once answered"


def test_txredisapi_retry_delay(txredisapi: Any) -> None:
    from pushd.broker.redis.pool import retry_alike

    what = _changed(TXREDISAPI, "RedisFactory.initialDelay / factor / maxDelay, retryDelay")
    factory = txredisapi.SubscriberFactory(isLazy=True)
    _present(TXREDISAPI, factory, "initialDelay", "factor", "maxDelay", "jitter", "retryDelay")
    retry_alike(factory)
    factory.jitter = 0  # normally the factory's own, for a spread of reconnects
    delays = [factory.retryDelay(attempt) for attempt in range(1, 8)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]), what + f": {delays}"


def test_txredisapi_stops_trying_when_a_connection_cannot_start(txredisapi: Any) -> None:
    """Why pushd's factories are KeepTrying: txredisapi's protocol calls
    `factory.stopTrying()` when AUTH or SELECT fails as a connection starts
    (a timeout included), and `disconnect` does not need it."""
    import inspect

    what = _changed(TXREDISAPI, "BaseRedisProtocol.connectionMade -> factory.stopTrying()")
    made = inspect.getsource(txredisapi.BaseRedisProtocol.connectionMade)
    assert made.count("self.factory.stopTrying()") == 2, what + ": KeepTrying may be moot"
    gone = inspect.getsource(txredisapi.RedisFactory.disconnect)
    assert "stopTrying" not in gone, what + ": disconnect goes through stopTrying"
    from pushd.broker.redis.pool import PoolFactory

    assert PoolFactory(None, 0, 1, isLazy=True).stopTrying().called, what


def test_txredisapi_pool_slots(txredisapi: Any) -> None:
    """QuietSlots makes txredisapi's slots as `startConnecting` does, each
    with a quiet ClientService made of the slot's own arguments."""
    import inspect

    from twisted.application.internet import ClientService

    what = _changed(TXREDISAPI, "_PoolSlot / _SlotFactory / RedisFactory.startConnecting")
    _present(TXREDISAPI, txredisapi, "_PoolSlot", "_SlotFactory")
    _present(TXREDISAPI, txredisapi._PoolSlot, "_retryDelay", "_prepareConnection", "start")
    made = inspect.getsource(txredisapi.RedisFactory.startConnecting)
    assert "_PoolSlot(self, endpoint, self.reconnect)" in made, what
    slot_init = inspect.getsource(txredisapi._PoolSlot.__init__)
    for part in (
        "ClientService(endpoint, _SlotFactory(factory, self)",
        "retryPolicy=self._retryDelay",
        "prepareConnection=self._prepareConnection",
    ):
        assert part in slot_init, what + f": _PoolSlot makes its service without {part!r}"
    from pushd.broker.redis.pool import PoolFactory
    from pushd.broker.redis.reachability import QuietClientService

    factory = PoolFactory(None, 0, 2, isLazy=True)
    factory.startConnecting(endpoints.TCP4ClientEndpoint(MemoryReactorClock(), "h", 1))
    assert [type(slot.service) for slot in factory.slots] == [QuietClientService] * 2, what
    assert all(slot.service.running for slot in factory.slots), what
    factory.disconnect()
    what = _changed(TXREDISAPI, "BaseRedisProtocol.connectionMade -> factory.connectionError")
    made = inspect.getsource(txredisapi.BaseRedisProtocol.connectionMade)
    assert made.count("self.factory.connectionError(msg)") == 2, what
    assert '"Redis error: could not auth: %s"' in made, what
    assert '"Redis error: could not set dbid=%s: %s"' in made, what
    what = _changed(TWISTED, "ClientService._log, handed to its state machine")
    assert "log=self._log" in inspect.getsource(ClientService.__init__), what


def test_txredisapi_sentinel_factory(txredisapi: Any) -> None:
    """A Shard makes its pool's SentinelConnectionFactory itself (not
    through `master_for`, which would connect at once through the private
    `_SentinelEndpoint`) and connects it through SentinelMaster."""
    _present(TXREDISAPI, txredisapi, "Sentinel", "SentinelConnectionFactory")
    what = _changed(TXREDISAPI, "SentinelConnectionFactory(sentinel, name, is_master, uuid, ...)")
    sentinel = object.__new__(txredisapi.Sentinel)
    factory = txredisapi.SentinelConnectionFactory(
        sentinel, "mymaster", True, None, 3, 2, isLazy=True, convertNumbers=False
    )
    assert isinstance(factory, txredisapi.RedisFactory), what + ": not a RedisFactory"
    assert (factory.sentinel_manager, factory.service_name) == (sentinel, "mymaster"), what
    assert factory.is_master and factory.dbid == 3 and factory.poolsize == 2, what
    _present(TXREDISAPI, sentinel, "discover_master")


def test_txredisapi_subscriber(txredisapi: Any) -> None:
    got: list[Any] = []

    class Subscriber(txredisapi.SubscriberProtocol):
        def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
            got.append((pattern, channel, message))

    factory = txredisapi.SubscriberFactory(isLazy=True)
    factory.protocol = Subscriber
    factory.charset = None
    factory.convertNumbers = False
    p = factory.buildProtocol(None)
    p.transport = StringTransport()  # not makeConnection: the pool would schedule a call
    clock = MemoryReactorClock()
    p.callLater = clock.callLater  # what follows a bulk reply is read a turn later
    what = _changed(TXREDISAPI, "SubscriberFactory.charset/convertNumbers, messageReceived")
    assert p.charset is None and p.convertNumbers is False, what + ": not read at buildProtocol"
    p.dataReceived(b"*3\r\n$7\r\nmessage\r\n$6\r\npushd:\r\n$4\r\n1.50\r\n")
    for _ in range(3):
        clock.advance(0)
    assert got == [(None, b"pushd:", b"1.50")], what


# -- CPython's json internals


def test_json_c_make_encoder() -> None:
    import json.encoder as encoder

    _present(PYTHON, encoder, "c_make_encoder", "c_encode_basestring", "c_encode_basestring_ascii")
    c_make_encoder = encoder.c_make_encoder  # type: ignore[attr-defined]
    c_encode_basestring = encoder.c_encode_basestring  # type: ignore[attr-defined]
    c_encode_basestring_ascii = encoder.c_encode_basestring_ascii  # type: ignore[attr-defined]

    what = _changed(PYTHON, "json.encoder.c_make_encoder")
    assert c_make_encoder is not None, what + " is gone (pushd falls back to the slow encoder)"

    def not_json(value: Any) -> Any:
        raise TypeError("not JSON")

    for quote, text in ((c_encode_basestring, '"é"'), (c_encode_basestring_ascii, '"\\u00e9"')):
        encode = c_make_encoder(None, not_json, quote, None, ":", ",", False, False, False)
        value = {"a": [1, 2**70, "é", None, True, 1.5]}
        assert "".join(encode(value, 0)) == f'{{"a":[1,{2**70},{text},null,true,1.5]}}', what
        with pytest.raises(ValueError):
            "".join(encode([math.nan], 0))
        with pytest.raises(TypeError):
            "".join(encode([object()], 0))


def test_json_scan_once() -> None:
    decoder = json.JSONDecoder(parse_float=float)
    _present(PYTHON, decoder, "scan_once")
    what = _changed(PYTHON, "JSONDecoder.scan_once")
    assert decoder.scan_once('{"a": 123456789012345678901234}  ', 0) == (  # type: ignore[attr-defined]
        {"a": 123456789012345678901234},
        31,
    ), what
    with pytest.raises(StopIteration):
        decoder.scan_once("  ", 0)  # type: ignore[attr-defined]

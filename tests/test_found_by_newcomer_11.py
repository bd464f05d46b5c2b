"""Newcomer 11's attacks on three changes (8ed56a7): a WebSocket drop that
would abort with bytes unsent closes and aborts DROP_LINGER later
(PushdServerProtocol.dropConnection), pongs count against the slow-consumer
bound (PushdServerProtocol.sendPong), and the service's stop writes the pending
failed-read line (Hub.stop, SharedReads.flush).

Defects (the tests failed on 8ed56a7; fixed since: dropConnection lingers
whenever bytes may be unsent, abort or not; `_admitted` releases and refuses a
connection already gone):

- the linger only covers Autobahn's aborts. When the CLIENT starts the closing
  handshake, Autobahn (server, STATE_OPEN) echoes the close and calls
  dropConnection(abort=False): a plain loseConnection with no timer. On plain
  TCP, a client that sends a close frame and then reads nothing keeps the
  connection (Twisted waits for its buffer to drain, forever); over TLS, a
  client that reads everything but never closes its socket keeps it too
  (Twisted's TLS waits for the peer's close_notify, forever). Either way the
  connection, its buffer, its place in the factory's clients and its address's
  --max-connections-per-ip share are held until the client chooses to go.
- the opening handshake's timeout (Autobahn's abort of a CONNECTING connection)
  during a slow admission (the application's authorization answering late)
  drops the connection, but the address's --max-connections-per-ip share is
  never released: onClose runs before `_admitted` sets `_address`.

What held: a server-initiated close (4000) to a client that neither reads nor
answers is gone within closeHandshakeTimeout + DROP_LINGER, on TCP and TLS, with
no timer left, the factory's client set empty and the address's count released;
a graceful stop with such clients (one of them the first defect's) ends within
--shutdown-timeout and its graces; the handshake timeout's abort drops a
connection still waiting for admission;
dropConnection twice sets one timer; a drop of a connection already lost sets
none; a healthy client pinging hard while it reads is not dropped; a pinger that
reads nothing is dropped once (pushd_slow_consumers_dropped_total counts 1);
Hub.stop with nothing pending, twice, and services started and stopped again in
one process each write their own pending line.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import LogEvent

from pushd.auth import ANONYMOUS
from pushd.broker import BrokerUnavailable
from pushd.metrics import Metrics
from pushd.reads import SharedReads
from pushd.transports.websocket import DROP_LINGER
from tests.support import PushdUnderTest, connect_raw, next_turn, wait_for
from tests.test_found_by_newcomer_10 import (
    _closes,
    _open_plain,
    _open_wss,
    _pinger,
    _read_lines,
    _server,
    _SlowReader,
    start_pushd,  # noqa: F401  (fixture)
)
from tests.test_tls import SelfSigned, self_signed, tls_pushd  # noqa: F401  (fixtures)
from tests.test_websocket_wire import HANDSHAKE, frame, server_frames

#: closeHandshakeTimeout (1 s, pushd's factory) + DROP_LINGER + slack for a busy machine.
GONE_WITHIN = 1.0 + DROP_LINGER + 1.5


def _lingers(server: Any) -> list[Any]:
    return [c for c in reactor.getDelayedCalls() if c.func == server._abort]


def _held(pushd: PushdUnderTest) -> tuple[int, int]:
    """The factory's clients and the loopback address's connection count."""
    assert pushd.service is not None
    factory = pushd.service.site.ws_factory
    return len(factory.clients), factory.gate.connections.count("127.0.0.1")


# -- defects


@pytest_twisted.ensureDeferred
async def test_client_close_then_reads_nothing_is_gone_within_the_linger(
    start_pushd: Any,  # noqa: F811
) -> None:
    """A slow reader with a backlog in Twisted's buffer sends a valid close
    (1000) and reads nothing more. Failed: Autobahn answers a client's close
    with dropConnection(abort=False), which the override passes through as a
    bare loseConnection, no DROP_LINGER timer; Twisted waits for the buffer to
    drain, which never happens: the connection stays open, in the factory's
    clients, counted against its address."""
    pushd = await start_pushd()
    client = await _SlowReader.open(pushd)
    try:
        server = _server(pushd)
        client.fill(server)
        client.sock.sendall(frame(0x8, b"\x03\xe8"))
        await wait_for(lambda: server.state == server.STATE_CLOSED, what="Autobahn's drop")
        with contextlib.suppress(AssertionError):
            await wait_for(lambda: not server.transport.connected, timeout=GONE_WITHIN)
        gone = not server.transport.connected
        held = _held(pushd)
    finally:
        client.sock.close()
    assert gone, "the connection outlived DROP_LINGER"
    assert held == (0, 0)


class _SslClient:
    """A wss client on Python's ssl module: unlike Twisted's TLS, it does not
    answer a close_notify (it never calls unwrap), as many clients do not."""

    def __init__(self, pushd: PushdUnderTest, cert: Any) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(cert))
        sock = socket.create_connection(("127.0.0.1", pushd.port))
        sock.setblocking(False)
        self.sock = context.wrap_socket(
            sock, server_hostname="127.0.0.1", do_handshake_on_connect=False
        )
        self.data = bytearray()
        self.eof = False

    def handshake(self) -> bool:
        try:
            self.sock.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        return True

    def read(self) -> bytes:
        with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLWantWriteError):
            chunk = self.sock.recv(65536)
            if not chunk:
                self.eof = True
            self.data.extend(chunk)
        return bytes(self.data)


@pytest_twisted.ensureDeferred
async def test_wss_client_close_then_never_closes_is_gone_within_the_linger(
    tls_pushd: PushdUnderTest,  # noqa: F811
    self_signed: SelfSigned,  # noqa: F811
) -> None:
    """Over TLS a client sends a valid close, reads the echo (and pushd's
    close_notify), and neither answers the close_notify nor closes its socket.
    Failed: Autobahn's dropConnection(abort=False) is TLS's loseConnection,
    which sends close_notify and waits for the peer's, with no timer: the
    connection is held as long as the client likes."""
    client = _SslClient(tls_pushd, self_signed.cert)
    try:
        await wait_for(client.handshake, what="the TLS handshake")
        client.sock.sendall(HANDSHAKE % b"")
        await wait_for(lambda: b"\r\n\r\n" in client.read(), what="the upgrade")
        await wait_for(lambda: _held(tls_pushd)[0] == 1, what="the client counted")
        server = _server(tls_pushd)
        client.sock.sendall(frame(0x8, b"\x03\xe8"))
        await wait_for(lambda: _closes(client.read()) == [1000], what="the echo")
        await wait_for(lambda: server.state == server.STATE_CLOSED, what="Autobahn's drop")
        with contextlib.suppress(AssertionError):
            await wait_for(
                lambda: client.read() is not None and not server.transport.connected,
                timeout=GONE_WITHIN,
            )
        gone = not server.transport.connected
        held = _held(tls_pushd)
        eof = client.eof
    finally:
        client.sock.close()
    assert eof  # pushd's close_notify came: it waits for the client's
    assert gone, "the connection outlived DROP_LINGER"
    assert held == (0, 0)


# -- what held


@pytest_twisted.ensureDeferred
async def test_server_close_to_a_client_that_reads_nothing_is_gone(
    start_pushd: Any,  # noqa: F811
) -> None:
    """pushd closes (4000) a client with a backlog that neither reads nor
    answers: after the close handshake's timeout the abort lingers, then the
    connection is gone, releasing everything it held."""
    pushd = await start_pushd()
    client = await _SlowReader.open(pushd)
    try:
        server = _server(pushd)
        client.fill(server)
        server.sendClose(4000, "bye")
        await wait_for(
            lambda: not server.transport.connected, timeout=GONE_WITHIN, what="the abort"
        )
        await wait_for(lambda: _held(pushd) == (0, 0), what="the release")
        assert _lingers(server) == []
    finally:
        client.sock.close()


@pytest_twisted.ensureDeferred
async def test_wss_server_close_to_a_client_that_never_answers_is_gone(
    tls_pushd: PushdUnderTest,  # noqa: F811
    self_signed: SelfSigned,  # noqa: F811
) -> None:
    """Over TLS (always lingering): pushd's close (4000) is read but never
    answered nor the socket closed: gone within the handshake timeout plus
    DROP_LINGER, the close frame delivered first."""
    raw = await _open_wss(tls_pushd, self_signed)
    await wait_for(lambda: _held(tls_pushd)[0] == 1, what="the client counted")
    server = _server(tls_pushd)
    server.sendClose(4000, "bye")
    await wait_for(lambda: raw.lost.called, timeout=GONE_WITHIN, what="the abort")
    assert _closes(raw.data) == [4000]
    await wait_for(lambda: _held(tls_pushd) == (0, 0), what="the release")
    assert _lingers(server) == []


@pytest_twisted.ensureDeferred
async def test_drop_twice_and_after_the_loss_set_one_timer_at_most(
    start_pushd: Any,  # noqa: F811
) -> None:
    pushd = await start_pushd()
    client = await _SlowReader.open(pushd)
    try:
        server = _server(pushd)
        client.fill(server)
        server.dropConnection(abort=True)
        server.dropConnection(abort=True)
        assert len(_lingers(server)) == 1
        await wait_for(lambda: not server.transport.connected, timeout=GONE_WITHIN)
        server.dropConnection(abort=True)
        assert _lingers(server) == []
    finally:
        client.sock.close()
    raw = await _open_plain(pushd)
    server = _server(pushd)
    transport = server.transport
    raw.transport.loseConnection()
    await wait_for(lambda: not transport.connected, what="the loss")
    server.dropConnection(abort=True)
    assert _lingers(server) == []


@pytest_twisted.ensureDeferred
async def test_a_reading_client_that_pings_hard_is_not_dropped(start_pushd: Any) -> None:  # noqa: F811
    pushd = await start_pushd(max_send_buffer=4096)
    raw = await _open_plain(pushd)
    pings = 2000
    for n in range(0, pings, 200):
        raw.transport.write(b"".join(frame(0x9, b"%0125d" % i) for i in range(n, n + 200)))
        await next_turn()
    await wait_for(
        lambda: len([f for f in server_frames(bytes(raw.data)) if f[0] == 0xA]) == pings,
        what="every pong",
    )
    assert _closes(bytes(raw.data)) == []
    assert not raw.lost.called
    raw.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_pinger_that_reads_nothing_is_dropped_once(start_pushd: Any) -> None:  # noqa: F811
    """Pings keep coming after the 4008 close: onPing answers only while OPEN,
    so the slow consumer is counted once, and the connection goes."""
    pushd = await start_pushd(max_send_buffer=65536)
    sock, server = await _pinger(pushd)
    try:
        block = memoryview(frame(0x9, b"p" * 125) * 500)
        for _ in range(60):
            view = block
            while view and server.transport.connected:
                with contextlib.suppress(BlockingIOError, ConnectionResetError):
                    view = view[sock.send(view) :]
                await next_turn()
            if not server.transport.connected:
                break
        await wait_for(lambda: not server.transport.connected, timeout=GONE_WITHIN)
    finally:
        sock.close()
    assert pushd.service is not None
    registry = pushd.service.metrics.registry
    dropped = registry.get_sample_value(
        "pushd_slow_consumers_dropped_total", {"transport": "websocket"}
    )
    assert dropped == 1


class _Down:
    def last_id(self, channel: str) -> Deferred[Any]:
        return fail(BrokerUnavailable("Redis down"))


def test_flush_with_nothing_pending_and_twice(log_events: list[LogEvent]) -> None:
    clock = Clock()
    reads = SharedReads(_Down(), clock, Metrics())  # type: ignore[arg-type]
    reads.flush()
    assert _read_lines(log_events) == []
    reads.read("a", None).addErrback(lambda _: None)
    clock.advance(0)
    reads.read("b", None).addErrback(lambda _: None)
    clock.advance(0)
    reads.flush()
    reads.flush()
    lines = _read_lines(log_events)
    assert len(lines) == 2 and "b" in lines[1], lines
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_services_started_and_stopped_again_each_say_their_pending_line(
    log_events: list[LogEvent],
) -> None:
    for n in range(3):
        pushd = PushdUnderTest.config()
        await pushd.start()
        reads = pushd.hub._reads
        reads._broker = _Down()
        for name in ("first", f"pending{n}"):
            reads.read(name, None).addErrback(lambda _: None)
            await next_turn()
            await next_turn()
        await pushd.stop()
        await pushd.stop()  # a second stop does nothing
        assert pushd.service is not None
        pushd.service.hub.stop()  # nor does a second flush
        assert [c for c in reactor.getDelayedCalls() if c.func == reads._log_failures] == []
    lines = _read_lines(log_events)
    assert len(lines) == 6, lines
    assert [line for line in lines if "pending" in line] == [
        lines[1],
        lines[3],
        lines[5],
    ]


@pytest_twisted.ensureDeferred
async def test_stop_with_clients_that_read_nothing_finishes_in_time(
    start_pushd: Any,  # noqa: F811
) -> None:
    """Two slow readers with a backlog, one of which closed first (the defect's
    connection, held open): the graceful stop still ends within
    --shutdown-timeout and two answer graces, and no linger timer outlives it."""
    pushd = await start_pushd(shutdown_timeout=1.0)
    assert pushd.service is not None
    socks = []
    try:
        for n in (1, 2):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", pushd.port))
            sock.sendall(HANDSHAKE % b"")
            socks.append(sock)
            await wait_for(lambda n=n: len(pushd.service.site.ws_factory.clients) == n)
        servers = tuple(pushd.service.site.ws_factory.clients)
        for server in servers:
            server.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            _SlowReader.fill(None, server)  # type: ignore[arg-type]
        socks[1].sendall(frame(0x8, b"\x03\xe8"))
        await wait_for(lambda: any(s.state == s.STATE_CLOSED for s in servers))
        started = reactor.seconds()
        await pushd.stop()
        took = reactor.seconds() - started
    finally:
        for sock in socks:
            sock.close()
    assert took < 1.0 + 2 * pushd.service.answer_grace + 1.0, took
    assert all(not s.transport.connected for s in servers)
    assert [c for s in servers for c in _lingers(s)] == []


@pytest_twisted.ensureDeferred
async def test_opening_handshake_timeout_during_a_slow_admission(
    start_pushd: Any,  # noqa: F811
) -> None:
    """The application answers admission after the opening handshake timed out
    (Autobahn's abort of a CONNECTING connection, through dropConnection). The
    abort itself held: the connection is gone at the timeout. Failed: the
    address's --max-connections-per-ip share, taken by Gate.admit before it
    asked the application, is never released: onClose ran (connectionLost)
    while `_address` was still None, and the late `_admitted` sets it on a
    connection already gone (pushd_connections{transport="websocket"} stays
    incremented too). The same for a client that leaves during admission."""
    pushd = await start_pushd(handshake_timeout=0.5)
    assert pushd.service is not None
    gate = pushd.service.site.ws_factory.gate
    answer: Deferred[Any] = Deferred()
    gate.authenticator = type("Slow", (), {"grants": lambda self, token, **_: answer})()
    raw = await _open_plain_raw(pushd)
    await wait_for(lambda: raw.lost.called, timeout=3.0, what="the timeout's abort")
    answer.callback(ANONYMOUS)
    await next_turn()
    await next_turn()
    assert _held(pushd) == (0, 0)


async def _open_plain_raw(pushd: PushdUnderTest) -> Any:
    raw = await connect_raw(pushd.port)
    raw.transport.write(HANDSHAKE % b"")
    return raw

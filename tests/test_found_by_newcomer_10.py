"""Newcomer 10's attacks on two changes: Autobahn's own writes going straight
to the socket (PushdServerProtocol.sendData, pushd.sending.write_now) and the
failed subscription reads logged once a second at most (pushd.reads.SharedReads).

Defects (the tests failed on the code they were written against, 36bf179;
fixed since: PushdServerProtocol.dropConnection and sendPong, Hub.stop,
SharedReads' bounded wait):

- over wss:// a client's invalid close frame (code 999, non-UTF-8 reason) still
  gets no 1002/1007 close frame: the direct send only applies to plain TCP, and
  Autobahn's abort in the same turn discards the frame from the TLS buffers;
- likewise on plain TCP when anything is still in Twisted's buffer (a client
  that reads slowly): the close frame queues behind it and the abort discards
  it, with the messages before it;
- pongs are not bounded: a client that reads nothing and sends pings makes
  pushd buffer every pong, far past --max-send-buffer, with no 4008;
- a failed read's log line pending when the service stops is never written (and
  its timer outlives the service): the last failures, counted in
  pushd_subscription_reads_failed_total, are never said;
- after the wall clock (reactor.seconds) steps back, a failed read's line waits
  as long as the step: the wait is `_next_line - now`, not capped at a second.

What held: frames written behind a backlog keep their order and are never cut
(a pong and a close frame after messages still in Twisted's buffer); a write to
a connection already lost does not raise; over wss a ping gets its pong, a
valid close its echo and a graceful stop its 1001; bursts and trickles of failed reads
are all counted in the lines, which match the metric, and no timer is left.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent

from pushd.broker import BrokerUnavailable
from pushd.metrics import Metrics
from pushd.reads import SharedReads
from tests.support import (
    TIMEOUT,
    PushdUnderTest,
    RawClient,
    connect_raw,
    next_turn,
    wait_for,
    with_timeout,
)
from tests.test_tls import SelfSigned, self_signed, tls_pushd  # noqa: F401  (fixtures)
from tests.test_websocket_wire import HANDSHAKE, frame, server_frames

# -- helpers


async def _open_wss(tls_pushd: PushdUnderTest, self_signed: SelfSigned) -> RawClient:  # noqa: F811
    """A raw WebSocket client of `tls_pushd` over TLS, its handshake done."""
    endpoint = wrapClientTLS(
        optionsForClientTLS("127.0.0.1", trustRoot=self_signed.trust_root),
        TCP4ClientEndpoint(reactor, "127.0.0.1", tls_pushd.port, timeout=TIMEOUT),
    )
    raw: RawClient = await with_timeout(connectProtocol(endpoint, RawClient()))
    raw.transport.write(HANDSHAKE % b"")
    assert (await raw.until(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    return raw


def _read_lines(events: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == "pushd.reads"]


def _closes(data: bytes) -> list[int]:
    return [
        struct.unpack("!H", payload[:2])[0]
        for opcode, payload in server_frames(data)
        if opcode == 0x8 and len(payload) >= 2
    ]


def _server(pushd: PushdUnderTest) -> Any:
    assert pushd.service is not None
    (server,) = tuple(pushd.service.site.ws_factory.clients)
    return server


async def _pinger(pushd: PushdUnderTest) -> tuple[socket.socket, Any]:
    """A client that reads nothing (4 KiB of receive buffer), its handshake
    done, and pushd's side of it (4 KiB of send buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", pushd.port))
    sock.setblocking(False)
    sock.sendall(HANDSHAKE % b"")
    await wait_for(lambda: pushd.service is not None and pushd.service.site.ws_factory.clients)
    server = _server(pushd)
    server.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return sock, server


def _buffered(transport: Any) -> int:
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


async def _open_plain(pushd: PushdUnderTest) -> RawClient:
    raw = await connect_raw(pushd.port)
    raw.transport.write(HANDSHAKE % b"")
    assert (await raw.until(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    await wait_for(lambda: pushd.service is not None and pushd.service.site.ws_factory.clients)
    return raw


@pytest_twisted.async_yield_fixture
async def start_pushd() -> AsyncIterator[Any]:
    """pushd in-process on the memory broker (the transport is what is tested)."""
    started: list[PushdUnderTest] = []

    async def start(**overrides: Any) -> PushdUnderTest:
        server = PushdUnderTest.config(**overrides)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


class _SlowReader:
    """A WebSocket client on a plain socket with a tiny receive buffer, that
    reads only when told: pushd's writes to it pile up in Twisted's buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = bytearray()

    @classmethod
    async def open(cls, pushd: PushdUnderTest) -> _SlowReader:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", pushd.port))
        sock.setblocking(False)
        sock.sendall(HANDSHAKE % b"")
        client = cls(sock)
        await wait_for(lambda: pushd.service is not None and pushd.service.site.ws_factory.clients)
        await wait_for(lambda: client._read_some() and b"\r\n\r\n" in client.data)
        server = _server(pushd)
        server.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return client

    def _read_some(self) -> bool:
        with contextlib.suppress(BlockingIOError):
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self.data.extend(chunk)
        return True

    def fill(self, server: Any) -> int:
        """Replies written until Twisted holds over 100 kB: how many."""
        sent = 0
        while _buffered(server.transport) < 100_000:
            server._reply(b'{"type":"pong","n":%d,"pad":"%s"}' % (sent, b"y" * 3000))
            sent += 1
            assert sent < 5000
        return sent

    async def read_to_end(self) -> bytes:
        async def until_eof() -> bool:
            while True:
                try:
                    chunk = self.sock.recv(65536)
                except BlockingIOError:
                    return False
                except ConnectionResetError:
                    return True
                if not chunk:
                    return True
                self.data.extend(chunk)

        await wait_for(until_eof, what="the end of the connection")
        return bytes(self.data)


# -- defects (fixed)


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        # The control, which holds: a valid close is echoed over TLS.
        pytest.param(b"\x03\xe8", 1000, id="close-1000-held"),
        pytest.param(b"\x03\xe7", 1002, id="close-code-999"),
        pytest.param(b"\x03\xe8\xff", 1007, id="close-reason-invalid-utf8"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_wss_invalid_close_frame_gets_a_close_frame(
    tls_pushd: PushdUnderTest,  # noqa: F811
    self_signed: SelfSigned,  # noqa: F811
    payload: bytes,
    code: int,
) -> None:
    """The commit's claim, over TLS: the close frame is answered before the drop.
    Failed: write_now only sends directly on plain TCP; over TLS the frame goes
    to TLSMemoryBIOProtocol, and Autobahn's abortConnection in the same turn
    (server, state CLOSING: dropConnection(abort=True)) discards it."""
    raw = await _open_wss(tls_pushd, self_signed)
    raw.transport.write(frame(0x8, payload))
    await with_timeout(raw.lost)
    assert _closes(raw.data) == [code]


@pytest_twisted.ensureDeferred
async def test_invalid_close_frame_behind_a_backlog_gets_its_close_frame(
    start_pushd: Any,
) -> None:
    """A slow reader with frames still in Twisted's buffer sends close code 999,
    then reads everything. Failed: the 1002 close frame queues behind the backlog
    (rightly, for order) and Autobahn's abortConnection in the same turn
    discards it together with the frames before it: the client gets neither."""
    pushd = await start_pushd()
    client = await _SlowReader.open(pushd)
    try:
        server = _server(pushd)
        sent = client.fill(server)
        client.sock.sendall(frame(0x8, b"\x03\xe7"))
        await wait_for(lambda: server.state == server.STATE_CLOSED, what="pushd to close")
        data = await client.read_to_end()
    finally:
        client.sock.close()
    texts = [p for opcode, p in server_frames(data) if opcode == 0x1]
    assert len(texts) == sent
    assert _closes(data) == [1002]


@pytest_twisted.ensureDeferred
async def test_pongs_to_a_client_that_reads_nothing_are_bounded(start_pushd: Any) -> None:
    """A client that reads nothing sends 125-byte pings. Failed: every pong is
    buffered by Twisted (sendData -> write_now -> transport.write), with no
    --max-send-buffer check and no 4008: pushd's memory grows with what the
    client uploads."""
    limit = 65536
    pushd = await start_pushd(max_send_buffer=limit)
    sock, server = await _pinger(pushd)
    try:
        transport = server.transport
        block = frame(0x9, b"p" * 125) * 500  # 65,500 bytes of pings
        worst = 0
        for _ in range(40):  # 2.6 MB of pings
            view = memoryview(block)
            while view:
                with contextlib.suppress(BlockingIOError):
                    view = view[sock.send(view) :]
                await next_turn()
                if not transport.connected:
                    break
            if not transport.connected:
                break
            worst = max(worst, _buffered(transport))
        # Dropped (4008), or what pushd holds for it stays near the bound.
        assert not transport.connected or worst <= 2 * limit, worst
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_a_pending_failed_read_line_is_written_when_the_service_stops(
    log_events: list[LogEvent],
) -> None:
    """Redis down: a read fails (logged at once), another within the second
    (its line is due up to 1 s later); the service stops. Failed: nothing flushes
    the pending line, its timer outlives the service, and in a process the
    reactor stops first: a counted failure is never logged."""
    pushd = PushdUnderTest.config()
    await pushd.start()
    try:
        reads = pushd.hub._reads

        class Down:
            def last_id(self, channel: str) -> Deferred[Any]:
                return fail(BrokerUnavailable("Redis down"))

        reads._broker = Down()
        reads.read("first", None).addErrback(lambda _: None)
        await next_turn()
        await next_turn()
        assert len(_read_lines(log_events)) == 1
        reads.read("second", None).addErrback(lambda _: None)
        await next_turn()
        assert reads._failed_reads == 1  # pending: due within the second
    finally:
        await pushd.stop()
    lines = _read_lines(log_events)
    pending = [c for c in reactor.getDelayedCalls() if c.func == reads._log_failures]
    for call in pending:  # leave the reactor clean whatever the outcome
        call.cancel()
    assert any("second" in line for line in lines), lines
    assert pending == []


def test_a_failed_read_after_the_clock_steps_back_is_said_within_a_second(
    log_events: list[LogEvent],
) -> None:
    """reactor.seconds() is the wall clock (time.time): NTP may step it back.
    A read fails at 1000 s (its line written, the next allowed at 1001 s); the
    clock steps back to 0; another read fails. Failed: its line waits
    `_next_line - now` = 1001 s, not at most FAILURES_LOGGED_EVERY, so an
    outage after the step goes unlogged for as long as the step (a timer set
    after the step, as Twisted's own are, is not held back)."""
    clock = Clock()
    reads = SharedReads(_FailingBroker(), clock, Metrics())  # type: ignore[arg-type]
    clock.advance(1000)
    reads.read("before", None).addErrback(lambda _: None)
    clock.advance(0)
    assert len(_read_lines(log_events)) == 1
    clock.rightNow = 0.0  # the wall clock stepped back
    reads.read("after", None).addErrback(lambda _: None)
    for _ in range(9):
        clock.advance(0.125)
    lines = _read_lines(log_events)
    pending = list(clock.getDelayedCalls())
    for call in pending:
        call.cancel()
    assert len(lines) == 2 and "after" in lines[1], (lines, [c.getTime() for c in pending])


# -- what held


@pytest_twisted.ensureDeferred
async def test_frames_behind_a_backlog_keep_their_order(start_pushd: Any) -> None:
    """Messages fill Twisted's buffer (the client reads nothing); then a ping
    from the client and pushd's close: the pong and the close frame come after
    every message, none cut or interleaved."""
    pushd = await start_pushd()
    client = await _SlowReader.open(pushd)
    try:
        server = _server(pushd)
        sent = client.fill(server)
        before = _buffered(server.transport)
        client.sock.sendall(frame(0x9, b"mine"))
        await wait_for(lambda: _buffered(server.transport) >= before + 6, what="the pong")
        server.sendClose(4000, "bye")
        await wait_for(
            lambda: client._read_some() and client.data.endswith(b"\x88\x05\x0f\xa0bye"),
            what="the close frame",
        )
        client.sock.sendall(frame(0x8, b"\x0f\xa0"))  # the client's answer, once read
        data = await client.read_to_end()
    finally:
        client.sock.close()
    frames = server_frames(data)
    assert [op for op, _ in frames] == [0x1] * sent + [0xA, 0x8]
    assert [int(p.split(b'"n":')[1].split(b",")[0]) for _, p in frames[:sent]] == list(range(sent))
    assert frames[-2][1] == b"mine"
    assert frames[-1][1] == b"\x0f\xa0bye"


@pytest_twisted.ensureDeferred
async def test_autobahns_writes_after_the_connection_is_lost_do_not_raise(
    start_pushd: Any,
) -> None:
    pushd = await start_pushd()
    raw = await _open_plain(pushd)
    server = _server(pushd)
    transport = server.transport
    raw.transport.loseConnection()
    await wait_for(lambda: not transport.connected, what="the server to see it lost")
    server.sendData(b"\x89\x00")
    server.sendData(b"\x88\x02\x03\xe9")
    server.sendPing(b"late")
    server.sendClose(4000, "late")


@pytest_twisted.ensureDeferred
async def test_wss_ping_is_answered_and_a_stop_says_1001(
    tls_pushd: PushdUnderTest,  # noqa: F811
    self_signed: SelfSigned,  # noqa: F811
) -> None:
    """Over TLS (no direct send: TLSMemoryBIOProtocol's write): a client's ping
    gets its pong, and the service's graceful stop its 1001 close frame."""
    raw = await _open_wss(tls_pushd, self_signed)
    raw.transport.write(frame(0x9, b"tls"))
    await raw.until(b"\x8a\x03tls")
    stopping = Deferred.fromCoroutine(tls_pushd.stop())
    await raw.until(b"\x88")
    await wait_for(lambda: _closes(raw.data), what="the close frame")
    raw.transport.loseConnection()
    await with_timeout(stopping)
    assert _closes(raw.data) == [1001]


class _FailingBroker:
    def last_id(self, channel: str) -> Deferred[Any]:
        return fail(BrokerUnavailable("Redis down"))

    def history(self, channel: str, since: str, limit: Any) -> Deferred[Any]:
        raise BrokerUnavailable("not connected")  # the synchronous path


def test_bursts_and_trickles_of_failed_reads_are_all_said(log_events: list[LogEvent]) -> None:
    """Failures at uneven times, with and without `since`, several subscribers
    per read: every read and subscription is in some line, the lines match the
    metric, and once quiet no timer is left."""
    clock = Clock()
    metrics = Metrics()
    reads = SharedReads(_FailingBroker(), clock, metrics)  # type: ignore[arg-type]
    subscriptions = 0
    for at, burst in [(0.0, 3), (0.25, 1), (0.75, 2), (1.0, 5), (1.5, 1), (4.0, 7), (4.125, 1)]:
        while clock.seconds() < at:  # in steps, as a reactor's turns go
            clock.advance(0.125)
        for n in range(burst):
            since = None if n % 2 else "1-0"
            for _ in range(n % 3 + 1):
                reads.read(f"c{n}", since).addErrback(lambda _: None)
                subscriptions += 1
        clock.advance(0)
    for _ in range(40):
        clock.advance(0.125)
    lines = _read_lines(log_events)
    total_reads = 0
    total_subscriptions = 0
    for line in lines:
        if line.startswith("a subscription read"):
            total_reads += 1
        else:
            total_reads += int(line.split()[0])
        total_subscriptions += int(line.split("; ")[1].split()[0])
    failed = metrics.registry.get_sample_value("pushd_subscription_reads_failed_total")
    assert total_reads == 20 == failed
    assert total_subscriptions == subscriptions
    assert clock.getDelayedCalls() == []
    # Never two lines within a second: at 0, 1 (0.25, 0.75), 2 (1, 1.5), 4 and 5.
    assert len(lines) == 5

"""Frames no well-behaved client sends, written byte by byte on a raw socket:
pushd answers protocol violations with a close frame carrying the RFC 6455 code."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct

import pytest
import pytest_twisted

from tests.support import (
    PushdUnderTest,
    RawClient,
    StartPushd,
    connect_raw,
    wait_for,
    with_timeout,
)

HANDSHAKE = (
    b"GET /ws%s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Unmasked server frames after the handshake's blank line."""
    data = data.split(b"\r\n\r\n", 1)[1]
    frames = []
    while len(data) >= 2:
        opcode, n = data[0] & 0x0F, data[1] & 0x7F
        offset = 2
        if n == 126:
            n, offset = struct.unpack("!H", data[2:4])[0], 4
        elif n == 127:
            n, offset = struct.unpack("!Q", data[2:10])[0], 10
        frames.append((opcode, data[offset : offset + n]))
        data = data[offset + n :]
    return frames


async def open_raw(pushd: PushdUnderTest, query: bytes = b"") -> RawClient:
    raw = await connect_raw(pushd.port)
    raw.transport.write(HANDSHAKE % query)
    assert (await raw.until(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    return raw


async def close_code(raw: RawClient) -> int:
    """The code of the server's close frame (we hang up rather than answer it)."""

    def closes() -> list[bytes]:
        return [payload for opcode, payload in server_frames(raw.data) if opcode == 0x8]

    await wait_for(closes, what="a close frame")
    raw.transport.loseConnection()
    return struct.unpack("!H", closes()[0][:2])[0]


@pytest.mark.parametrize(
    ("bytes_sent", "code"),
    [
        (frame(0x1, b'{"type":"ping","x":"\xff\xfe"}'), 1007),  # invalid UTF-8
        (frame(0x1, b'{"type":"ping"}', masked=False), 1002),  # client frames must be masked
        (frame(0x3, b"?"), 1002),  # reserved opcode
        (frame(0x1, b"x" * 70000), 1009),  # over --max-message-size and a frame's fields
        (frame(0x9, b"p" * 200), 1002),  # control frame over 125 bytes
        (frame(0x1, b"a", fin=False) + frame(0x1, b"b"), 1002),  # new message mid-fragments
    ],
    # Named, not by their bytes: the masks are random, and pytest-xdist's workers
    # must collect the same test ids.
    ids=["bad-utf8", "unmasked", "reserved-opcode", "too-large", "long-control", "mid-fragments"],
)
@pytest_twisted.ensureDeferred
async def test_protocol_violations_close_with_a_code(
    pushd: PushdUnderTest, bytes_sent: bytes, code: int
) -> None:
    raw = await open_raw(pushd)
    raw.transport.write(bytes_sent)
    assert await close_code(raw) == code


@pytest_twisted.ensureDeferred
async def test_autobahns_own_frames_go_straight_to_the_socket(pushd: PushdUnderTest) -> None:
    """A ping, a close frame, the handshake's answer: in the socket at once
    (pushd.sending), not in Twisted's buffer until a later turn, where a timer
    due first (the close handshake's, in a slow turn) could drop the
    connection with its close frame unsent."""
    sock = socket.create_connection(("127.0.0.1", pushd.port))
    sock.setblocking(False)
    got = bytearray()

    def subscribed() -> bool:
        with contextlib.suppress(BlockingIOError):
            got.extend(sock.recv(65536))
        return b'"subscribed"' in got

    try:
        sock.sendall(HANDSHAKE % b"?channel=direct")
        await wait_for(subscribed, what="the subscribed frame")
        assert pushd.service is not None
        (session,) = pushd.service.hub._channels["direct"].subscribers
        server = session._out
        server.sendPing(b"now")
        # Read before the reactor runs again: only a direct send is there.
        assert sock.recv(64) == b"\x89\x03now"
        server.sendClose(4000, "bye")
        assert sock.recv(64) == b"\x88\x05\x0f\xa0bye"
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_fragmented_frames_are_one_message(pushd: PushdUnderTest) -> None:
    raw = await open_raw(pushd)
    message = b'{"type":"subscribe","channel":"frag"}'
    raw.transport.write(
        frame(0x1, message[:10], fin=False)
        + frame(0x0, message[10:20], fin=False)
        + frame(0x9, b"hi")  # a control frame may come between fragments
        + frame(0x0, message[20:])
    )
    await raw.until(b'"subscribed"')
    texts = [json.loads(p) for op, p in server_frames(raw.data) if op == 0x1]
    assert texts == [
        {"type": "subscribed", "channel": "frag", "recovered": False, "position": None}
    ]
    assert (0xA, b"hi") in server_frames(raw.data)
    raw.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_garbage_instead_of_a_handshake_gets_400(pushd: PushdUnderTest) -> None:
    raw = await connect_raw(pushd.port)
    raw.transport.write(b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n")
    await raw.lost
    assert raw.data.startswith(b"HTTP/1.1 400")


@pytest_twisted.ensureDeferred
async def test_a_peer_that_never_answers_pings_is_dropped(start_pushd: StartPushd) -> None:
    # Autobahn's timers run in whole seconds: shorter values would not work.
    pushd = await start_pushd(ping_interval=1, ping_timeout=1)
    silent = await open_raw(pushd)
    polite = await pushd.connect()  # Autobahn answers pings by itself
    await with_timeout(silent.lost, 5)
    assert any(opcode == 0x9 for opcode, _ in server_frames(silent.data))
    assert not polite.closed.called
    polite.send({"type": "ping"})
    assert await polite.next() == {"type": "pong"}
    await polite.close()

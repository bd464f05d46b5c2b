"""The middle layer's harness (and two checks of its parsers): a whole pushd on the memory
broker and a `MemoryReactorClock`, HTTP connections over `StringTransport`s fed
raw bytes, and a parser of the bytes they answer.

Nothing here listens, sleeps or reads the clock on the wall: time moves only
when a test calls `Node.advance`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from pushd.service import PushdService, make_service
from pushd.testing import make_config

#: Seconds since the epoch the reactor starts at: ids of today's form.
EPOCH = 1_700_000_000


class Transport(StringTransport):
    """A StringTransport with TCP's half-close, as pushd's gentle close uses it."""

    write_closed = False
    aborted = False
    protocol: Any = None

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()  # type: ignore[no-untyped-call]


class Node:
    """One pushd process (service not started: nothing listens) on a MemoryReactorClock."""

    def __init__(self, **options: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(EPOCH)
        self.config = make_config(**options)
        self.service: PushdService = make_service(self.config, self.reactor)
        self.site: Any = self.service.site
        self.broker: Any = self.service.broker
        self.hub: Any = self.service.hub
        self.fast: Any = self.site.fast
        self.ws_factory: Any = self.site.ws_factory

    def connect(self, host: str = "127.0.0.1") -> Conn:
        return Conn(self, host)

    def advance(self, seconds: float = 0.0) -> None:
        self.reactor.advance(seconds)

    def publish(self, channel: str, data: bytes) -> str:
        """Publish straight to the broker; the hub hands it out at the end of the turn."""
        msg_id = str(self.broker.publish(channel, data).result.id)
        self.advance(0)
        return msg_id

    def taken(self) -> tuple[int, int]:
        return self.fast.tried, self.fast.taken

    def websocket(
        self, target: str = "/ws", headers: dict[str, str] | None = None, host: str = "127.0.0.1"
    ) -> WsConn:
        """A WebSocket client past its opening handshake (check `status`)."""
        return WsConn(self, target, headers, host)


class Conn:
    """One HTTP connection to the node's site: `send` feeds reads, `responses`
    parses what the server wrote so far."""

    def __init__(self, node: Node, host: str = "127.0.0.1") -> None:
        self.node = node
        peer = IPv4Address("TCP", host, 40000)
        self.transport: Any = Transport(  # type: ignore[no-untyped-call]
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8080), peerAddress=peer
        )
        self.protocol: Any = node.site.buildProtocol(peer)
        self.protocol.makeConnection(self.transport)
        # As a TCP server transport: Autobahn's upgrade puts its protocol here.
        self.transport.protocol = self.protocol

    def send(self, *reads: bytes) -> None:
        """Each of `reads` as one read of the socket (to whoever holds it now:
        after a WebSocket upgrade, Autobahn's protocol)."""
        for data in reads:
            self.transport.protocol.dataReceived(data)
        self.node.advance(0)

    def raw(self) -> bytes:
        return bytes(self.transport.value())

    def responses(self) -> list[Response]:
        responses, rest = parse_responses(self.raw())
        assert rest == b"", rest
        return responses

    def one(self) -> Response:
        responses = self.responses()
        assert len(responses) == 1, responses
        return responses[0]

    def close(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.transport.protocol.connectionLost(Failure(ConnectionDone()))
        self.node.advance(0)


class WsConn(Conn):
    """A WebSocket connection: the handshake sent, the server's frames parsed."""

    def __init__(self, node: Node, target: str, headers: dict[str, str] | None, host: str) -> None:
        super().__init__(node, host)
        request, self.accept = ws_handshake(target, headers)
        self.send(request)
        parsed = parse_head(self.raw())
        assert parsed is not None, self.raw()
        self.handshake, self._at = parsed
        self.status = self.handshake.status

    @property
    def ws(self) -> Any:
        """Autobahn's protocol, once upgraded."""
        return self.transport.protocol

    def frames(self) -> list[Frame]:
        frames, _ = server_frames(self.raw()[self._at :])
        return frames

    def events(self) -> list[Any]:
        """The text frames, parsed."""
        return [f.json() for f in self.frames() if f.opcode == 0x1]

    def take(self) -> list[Any]:
        """The text frames since the last `take`."""
        events = self.events()
        seen = getattr(self, "_seen", 0)
        self._seen = len(events)
        return events[seen:]

    def close_code(self) -> int | None:
        codes = [f.close_code for f in self.frames() if f.opcode == 0x8]
        return codes[-1] if codes else None

    def json(self, frame: Any) -> None:
        self.send(client_json(frame))


@dataclass
class Response:
    status: int
    headers: dict[str, list[str]] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[-1] if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def contract(self) -> tuple[int, Any]:
        """What the contract says of it: the status and the JSON body."""
        return self.status, self.json()


def parse_head(data: bytes) -> tuple[Response, int] | None:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].decode("latin-1").split("\r\n")
    version, status, *_ = lines[0].split(" ", 2)
    assert version in ("HTTP/1.1", "HTTP/1.0"), lines[0]
    response = Response(int(status))
    for line in lines[1:]:
        name, _, value = line.partition(":")
        response.headers.setdefault(name.lower(), []).append(value.strip())
    return response, end + 4


def parse_responses(data: bytes) -> tuple[list[Response], bytes]:
    """The whole responses in `data` (a 100 Continue is one, without a body),
    and the bytes of an unfinished one."""
    out: list[Response] = []
    while data:
        parsed = parse_head(data)
        if parsed is None:
            return out, data
        response, at = parsed
        if 100 <= response.status < 200 and response.status != 101:
            out.append(response)
            data = data[at:]
            continue
        if response.header("transfer-encoding") == "chunked":
            body, size = b"", None
            pos = at
            while size != 0:
                line_end = data.find(b"\r\n", pos)
                if line_end < 0:
                    return out, data
                size = int(data[pos:line_end], 16)
                if len(data) < line_end + 2 + size + 2:
                    return out, data
                body += data[line_end + 2 : line_end + 2 + size]
                pos = line_end + 2 + size + 2
            response.body = body
            data = data[pos:]
        else:
            length = int(response.header("content-length") or 0)
            if len(data) < at + length:
                return out, data
            response.body = data[at : at + length]
            data = data[at + length :]
        out.append(response)
    return out, b""


def chunked_body(data: bytes) -> bytes:
    """`data` as the body of one chunked request (two chunks when it has two bytes or more)."""
    half = len(data) // 2
    chunks = [c for c in (data[:half], data[half:]) if c]
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


def post(
    target: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    chunked: bool = False,
    method: str = "POST",
) -> bytes:
    """One request's bytes, with Host and Content-Length (or chunked) unless given."""
    fields = {"Host": "pushd"}
    if chunked:
        fields["Transfer-Encoding"] = "chunked"
    elif method in ("POST", "PUT") or body:
        fields["Content-Length"] = str(len(body))
    fields.update(headers or {})
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return head.encode("latin-1") + b"\r\n" + (chunked_body(body) if chunked else body)


def get(target: str, headers: dict[str, str] | None = None) -> bytes:
    return post(target, headers=headers, method="GET")


# -- WebSocket, as a client writes it


def ws_handshake(target: str, headers: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A client's opening handshake and the Sec-WebSocket-Accept it expects."""
    key = base64.b64encode(os.urandom(16)).decode()
    fields = {
        "Host": "pushd",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key,
        "Sec-WebSocket-Version": "13",
        **(headers or {}),
    }
    magic = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    accept = base64.b64encode(hashlib.sha1(key.encode() + magic).digest()).decode()
    head = f"GET {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return head.encode() + b"\r\n", accept


def client_frame(payload: bytes, opcode: int = 0x1, fin: bool = True, mask: bytes = b"") -> bytes:
    """A masked client frame (RFC 6455 5.2)."""
    mask = mask or os.urandom(4)
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def client_json(frame: Any) -> bytes:
    return client_frame(json.dumps(frame).encode())


@dataclass
class Frame:
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        if self.opcode != 0x8 or len(self.payload) < 2:
            return None
        return int(struct.unpack("!H", self.payload[:2])[0])

    def json(self) -> Any:
        assert self.opcode == 0x1, self
        return json.loads(self.payload)


def server_frames(data: bytes) -> tuple[list[Frame], bytes]:
    """The unmasked server frames in `data`, and the bytes of an unfinished one."""
    frames: list[Frame] = []
    while len(data) >= 2:
        opcode, n = data[0] & 0x0F, data[1] & 0x7F
        assert data[1] & 0x80 == 0, "a server frame is never masked"
        at = 2
        if n == 126:
            if len(data) < 4:
                break
            (n,) = struct.unpack("!H", data[2:4])
            at = 4
        elif n == 127:
            if len(data) < 10:
                break
            (n,) = struct.unpack("!Q", data[2:10])
            at = 10
        if len(data) < at + n:
            break
        frames.append(Frame(opcode, data[at : at + n]))
        data = data[at + n :]
    return frames, data


# -- the harness's own checks (so that its parsers are not what a test measures)


def test_the_response_parser_reads_lengths_chunks_and_continues() -> None:
    data = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n"
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\nabc"
    )
    responses, rest = parse_responses(data)
    assert [(r.status, r.body) for r in responses] == [(100, b""), (200, b"ok"), (200, b"abc")]
    assert rest.startswith(b"HTTP/1.1 404")


def test_the_frame_parser_reads_every_length_form() -> None:
    from pushd.transports.websocket import text_frame

    payloads = [b"", b"x" * 125, b"y" * 126, b"z" * 70000]
    data = b"".join(text_frame(p) for p in payloads)
    frames, rest = server_frames(data + text_frame(b"cut")[:3])
    assert [f.payload for f in frames] == payloads and rest == text_frame(b"cut")[:3]
    masked = client_frame(b"abc", mask=b"\x01\x02\x03\x04")
    assert masked == b"\x81\x83\x01\x02\x03\x04" + bytes((0x61 ^ 1, 0x62 ^ 2, 0x63 ^ 3))

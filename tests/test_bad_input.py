"""Bad input of every kind, on a server with a healthy subscriber.

Malformed HTTP, oversize headers, garbage before the handshake, bodies that are
not JSON or not UTF-8, bad channel names and `since`, bad tokens, protocol
violations in WebSocket frames: each gets the contract's answer (a status and
error code, an `error` frame, or a close code), pushd logs no failure, and a
healthy subscriber on the same server goes on receiving throughout.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from tests.support import (
    SECRET,
    PushdUnderTest,
    RawClient,
    StartPushd,
    WSClient,
    connect_raw,
    token,
    wait_for,
    with_timeout,
)
from tests.test_websocket_wire import HANDSHAKE, frame, open_raw, server_frames

AUDIENCE = "pushd"
MAX_HEADER_SIZE = 4096
MAX_MESSAGE_SIZE = 65536
# A client of the frame tests: may subscribe to news, dm#* and open.*, publish to pub.*.
CLIENT_TOKEN = token("alice", ["news", "dm#*", "open.*"], ["pub.*"], aud=AUDIENCE)
WS_QUERY = b"?token=" + CLIENT_TOKEN.encode()
JSON = {"content-type": ["application/json"]}

# -- the server and its healthy subscriber


@dataclass
class Healthy:
    """pushd, a subscriber of `healthy` that must never notice the bad input,
    and every failure pushd logged meanwhile."""

    pushd: PushdUnderTest
    client: WSClient
    failures: list[str] = field(default_factory=list)
    published: int = 0

    async def still_fine(self) -> None:
        """The subscriber receives a fresh message, and nothing went wrong in pushd."""
        assert not self.client.closed.called, "the healthy subscriber was disconnected"
        self.published += 1
        data = {"n": self.published}
        msg_id = await self.pushd.publish("healthy", data)
        assert await self.client.next(5) == {
            "type": "message",
            "channel": "healthy",
            "id": msg_id,
            "data": data,
        }
        assert not self.failures, "\n".join(self.failures)


async def _start(start_pushd: StartPushd, **overrides: Any) -> Healthy:
    pushd = await start_pushd(
        token_secret=SECRET,
        token_audience=AUDIENCE,
        max_header_size=MAX_HEADER_SIZE,
        max_message_size=MAX_MESSAGE_SIZE,
        **overrides,
    )
    client = await pushd.connect(f"?channel=healthy&token={token(None, ['healthy'], aud=AUDIENCE)}")
    subscribed = await client.next(5)  # and its "position", whatever it is
    assert subscribed == {
        **subscribed,
        "type": "subscribed",
        "channel": "healthy",
        "recovered": False,
    }
    return Healthy(pushd, client)


@pytest.fixture
def logged_failures() -> Iterator[list[str]]:
    """What the twistd log would show as errors while the test runs."""
    failures: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event or event.get("log_level") in (LogLevel.error, LogLevel.critical):
            text = formatEvent(event)
            if "log_failure" in event:
                text += "\n" + event["log_failure"].getTraceback()
            failures.append(text)

    globalLogPublisher.addObserver(observe)
    yield failures
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.async_yield_fixture
async def healthy(start_pushd: StartPushd, logged_failures: list[str]) -> AsyncIterator[Healthy]:
    server = await _start(start_pushd)
    server.failures = logged_failures
    await server.still_fine()
    yield server
    await server.client.close()


# -- helpers


def http_answer(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """The status, headers (lower-case names) and body of one HTTP/1.1 response."""
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, data
    status_line, *lines = head.decode("latin-1").split("\r\n")
    m = re.fullmatch(r"HTTP/1\.1 (\d{3}) [ -~]*", status_line)
    assert m is not None, status_line
    headers = {}
    for line in lines:
        name, colon, value = line.partition(":")
        assert colon, line
        headers[name.strip().lower()] = value.strip()
    return int(m.group(1)), headers, body


async def raw_exchange(pushd: PushdUnderTest, request: bytes) -> bytes:
    """Send bytes, read until pushd hangs up (every case here ends the connection)."""
    raw = await connect_raw(pushd.port)
    raw.transport.write(request)
    try:
        await with_timeout(raw.lost, 5)
    finally:
        raw.transport.abortConnection()
    return raw.data


def texts(raw: RawClient) -> list[Any]:
    """The complete text frames the server sent so far, parsed; without the acknowledgement
    of the personal channel (`user#<sub>`) a connection with a `sub` may be subscribed to."""
    found = []
    for opcode, payload in server_frames(raw.data):
        if opcode == 0x1:
            try:
                found.append(json.loads(payload))
            except ValueError:
                break  # the frame has not fully arrived
    personal = {"type": "subscribed", "channel": "user#alice"}
    return [f for f in found if {k: f.get(k) for k in personal} != personal]


def b64(value: bytes) -> str:
    return base64.urlsafe_b64encode(value).rstrip(b"=").decode()


def unsigned_token(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A token with `alg: none` style structure: header.payload. and no signature."""
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}."


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "mallory", "channels": ["*"], "exp": int(time.time()) + 3600, **extra}


def encode(body: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a short key for HS512: the point of the test
        return jwt.encode(body, secret, algorithm=algorithm)


# -- HTTP: malformed requests, oversize heads


def _request(path: bytes, *headers: bytes, method: bytes = b"GET", body: bytes = b"") -> bytes:
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    return b"\r\n".join([*lines, *headers, b"", b""]) + body


RAW_HTTP = [
    pytest.param(b"GARBAGE\r\n\r\n", 400, None, id="request-line-garbage"),
    pytest.param(
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, None, id="tls-hello"
    ),
    pytest.param(b"\x00\xff\xfe binary\r\n\r\n", 400, None, id="binary-garbage"),
    pytest.param(b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 400, None, id="http-9.9"),
    pytest.param(b"GET /\r\n\r\n", 400, None, id="no-http-version"),
    pytest.param(b"GET / HTTP/1.1 extra\r\n\r\n", 400, None, id="request-line-4-words"),
    pytest.param(b"GET / HTTP/1.1\r\nHost x\r\n\r\n", 400, None, id="header-without-colon"),
    pytest.param(
        b"garbage\r\n" + HANDSHAKE % WS_QUERY,
        400,
        None,
        id="garbage-before-handshake",
    ),
    pytest.param(
        _request(b"/channels/x", b"Content-Length: abc", method=b"POST"),
        400,
        None,
        id="content-length-not-a-number",
    ),
    pytest.param(
        _request(b"/channels/x", b"Content-Length: 1", b"Content-Length: 2", method=b"POST"),
        400,
        None,
        id="content-length-twice",
    ),
    pytest.param(
        _request(b"/channels/x", b"Transfer-Encoding: chunked", method=b"POST", body=b"zz\r\n"),
        400,
        None,
        id="chunk-size-not-hex",
    ),
    pytest.param(
        _request(b"/channels/" + b"a" * MAX_HEADER_SIZE), 414, "url_too_long", id="url-too-long"
    ),
    pytest.param(
        _request(b"/", *(b"X-Filler-%03d: %s" % (n, b"f" * 50) for n in range(100))),
        431,
        "headers_too_large",
        id="too-many-headers",
    ),
    pytest.param(
        _request(b"/", b"X-Huge: " + b"h" * MAX_HEADER_SIZE),
        431,
        "headers_too_large",
        id="one-huge-header",
    ),
    pytest.param(_request(b"/channels/caf\xe9", method=b"POST"), 400, None, id="raw-latin1-in-url"),
    pytest.param(
        _request(b"/channels/caf%E9", method=b"POST", body=b""),
        400,
        "bad_channel",
        id="channel-percent-encoded-not-utf8",
    ),
]


@pytest.mark.parametrize(("request_bytes", "status", "code"), RAW_HTTP)
@pytest_twisted.ensureDeferred
async def test_malformed_http(
    healthy: Healthy, request_bytes: bytes, status: int, code: str | None
) -> None:
    answer = await raw_exchange(healthy.pushd, request_bytes)
    got, headers, body = http_answer(answer)
    assert got == status, answer[:300]
    # Every error carries the contract's JSON, the HTTP parser's own included.
    assert headers["content-type"] == "application/json", answer[:300]
    error = json.loads(body)
    assert error["error"] == (code or "bad_request") and error["message"], error
    await healthy.still_fine()


def _publish(*headers: bytes, body: bytes = b"1") -> bytes:
    """A kept-alive publish as the hot path takes them, with `headers` added."""
    lines = [b"POST /channels/hot HTTP/1.1", b"Host: 127.0.0.1", *headers]
    return b"\r\n".join([*lines, b"Content-Length: %d" % len(body), b"", b""]) + body


HOT_PATH_MALFORMED = [
    pytest.param(_publish(b"X-A: a\x00b"), "bad_request", id="nul-in-value"),
    pytest.param(_publish(b"X-A: a\rb"), "bad_request", id="bare-cr-in-value"),
    pytest.param(_publish(b"X-A: a\nb"), "bad_request", id="bare-lf-in-value"),
    pytest.param(_publish(b"X-A: a\x01b"), "bad_request", id="control-byte-in-value"),
    pytest.param(_publish(b"X/A: a"), "bad_request", id="bad-name-character"),
    pytest.param(_publish(b"X-A : a"), "bad_request", id="space-before-colon"),
    pytest.param(_publish(b"X-A: a", b" folded"), "bad_request", id="obs-fold"),
    pytest.param(
        _publish(*(b"X-F%d: v" % n for n in range(120))), "too_many_headers", id="101-headers"
    ),
    pytest.param(_publish(b"Content-Length: 1"), "bad_request", id="content-length-twice"),
]


@pytest.mark.parametrize(("request_bytes", "code"), HOT_PATH_MALFORMED)
@pytest_twisted.ensureDeferred
async def test_malformed_publish_reaches_the_hot_path_and_is_refused(
    healthy: Healthy, request_bytes: bytes, code: str
) -> None:
    """In one read, shaped as the hot path takes publishes: it looks at it, refuses
    it, and twisted.web answers 400 (as it would the same bytes in many reads)."""
    assert healthy.pushd.service is not None
    fast = healthy.pushd.service.site.fast
    tried, taken = fast.tried, fast.taken
    answer = await raw_exchange(healthy.pushd, request_bytes)
    got, headers, body = http_answer(answer)
    assert got == 400 and headers["connection"] == "close", answer[:300]
    assert json.loads(body)["error"] == code
    assert (fast.tried - tried, fast.taken - taken) == (1, 0)
    await healthy.still_fine()


@pytest_twisted.ensureDeferred
async def test_headers_sent_too_slowly_get_408(
    start_pushd: StartPushd, logged_failures: list[str]
) -> None:
    server = await _start(start_pushd, handshake_timeout=0.5)
    server.failures = logged_failures
    raw = await connect_raw(server.pushd.port)
    started = time.monotonic()
    raw.transport.write(b"GET / HTTP/1.1\r\n")
    while not raw.lost.called and time.monotonic() - started < 5:  # a header line every 0.1 s
        raw.transport.write(b"X-Slow: %d\r\n" % time.monotonic_ns())
        await deferLater(reactor, 0.1, lambda: None)
    await with_timeout(raw.lost, 5)
    assert 0.45 < time.monotonic() - started < 3
    status, _, body = http_answer(raw.data)
    assert status == 408 and json.loads(body)["error"] == "timeout", raw.data
    await server.still_fine()
    await server.client.close()


# -- the producer API: bodies, channel names, history queries


def _post(channel: str, body: bytes, headers: dict[str, list[str]] | None = None) -> Any:
    return ("POST", channel, body, headers or {})


PRODUCER = [
    pytest.param(_post("news", b"{oops", JSON), 400, "bad_json", id="json-syntax"),
    pytest.param(_post("news", b'{"a": 1} x', JSON), 400, "bad_json", id="json-trailing-garbage"),
    pytest.param(_post("news", b"", JSON), 400, "bad_json", id="json-empty"),
    pytest.param(_post("news", b"{'a': 1}", JSON), 400, "bad_json", id="json-single-quotes"),
    pytest.param(_post("news", b"NaN", JSON), 400, "bad_json", id="json-nan"),
    pytest.param(
        _post("news", b'{"x": -Infinity}', JSON),
        400,
        "bad_json",
        id="json-infinity",
    ),
    # Numbers that do not fit a double: a lenient parser reads them as Infinity.
    pytest.param(_post("news", b'{"x": 1e400}', JSON), 400, "bad_json", id="json-1e400"),
    pytest.param(_post("news", b"-1e400", JSON), 400, "bad_json", id="json-minus-1e400"),
    pytest.param(
        _post("news", b"[" * 30000 + b"]" * 30000, JSON),
        400,
        "bad_json",
        id="json-deep-nesting",
    ),
    # Valid UTF-8, but the string it decodes to is not: either code is a fair answer.
    pytest.param(
        _post("news", b'"\\ud800"', JSON),
        400,
        ("bad_json", "bad_text"),
        id="json-lone-surrogate",
    ),
    pytest.param(_post("news", b'"caf\xe9"', JSON), 400, "bad_text", id="json-latin1"),
    pytest.param(_post("news", b"caf\xe9"), 400, "bad_text", id="text-latin1"),
    pytest.param(_post("news", b"\xed\xa0\x80"), 400, "bad_text", id="text-utf8-surrogate"),
    pytest.param(_post("news", b"\xc0\xaf"), 400, "bad_text", id="text-overlong-utf8"),
    pytest.param(_post("news", b"euro \xe2\x82"), 400, "bad_text", id="text-truncated-utf8"),
    pytest.param(_post("bad name", b"x"), 400, "bad_channel", id="channel-space"),
    pytest.param(_post("x" * 129, b"x"), 400, "bad_channel", id="channel-too-long"),
    pytest.param(_post("café", b"x"), 400, "bad_channel", id="channel-not-ascii"),
    pytest.param(_post("dm#", b"x"), 400, "bad_channel", id="channel-user-no-ids"),
    pytest.param(_post("dm#a,,b", b"x"), 400, "bad_channel", id="channel-user-empty-id"),
    pytest.param(_post("dm#a#b", b"x"), 400, "bad_channel", id="channel-two-hashes"),
    pytest.param(
        _post("news", b"x" * (MAX_MESSAGE_SIZE + 1)), 413, "too_large", id="body-too-large"
    ),
    pytest.param(
        _post("news", b"x", {"idempotency-key": ["k" * 257]}),
        400,
        "bad_idempotency_key",
        id="idempotency-key-too-long",
    ),
    pytest.param(("GET", "news", "since=garbage", {}), 400, "bad_since", id="since-garbage"),
    pytest.param(("GET", "news", "since=1-2-3", {}), 400, "bad_since", id="since-three-parts"),
    pytest.param(("GET", "news", "since=-1-0", {}), 400, "bad_since", id="since-negative"),
    pytest.param(("GET", "news", "since=1.5-0", {}), 400, "bad_since", id="since-fraction"),
    pytest.param(("GET", "news", "since=", {}), 400, "bad_since", id="since-empty"),
    pytest.param(
        ("GET", "news", "since=99999999999999999999-0", {}),
        400,
        "bad_since",
        id="since-beyond-64-bits",
    ),
    pytest.param(("GET", "news", "limit=0", {}), 400, "bad_limit", id="limit-zero"),
    pytest.param(("GET", "news", "limit=ten", {}), 400, "bad_limit", id="limit-not-a-number"),
    pytest.param(("GET", "bad name", "", {}), 400, "bad_channel", id="history-bad-channel"),
]


@pytest.mark.parametrize(("call", "status", "code"), PRODUCER)
@pytest_twisted.ensureDeferred
async def test_producer_bad_input(
    healthy: Healthy,
    call: tuple[str, str, Any, dict[str, list[str]]],
    status: int,
    code: str | tuple[str, ...],
) -> None:
    method, channel, body_or_query, headers = call
    pushd = healthy.pushd
    client = await pushd.connect(f"?channel=news&token={token(None, ['news'], aud=AUDIENCE)}")
    assert (await client.next(5))["type"] == "subscribed"
    if method == "POST":
        response = await pushd.post(channel, body_or_query, headers=headers)
    else:
        from urllib.parse import quote

        url = f"{pushd.url}/channels/{quote(channel, safe='')}/history?{body_or_query}"
        response = await treq.get(url, persistent=False)
    text = await response.text()
    assert response.code == status, text
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    error = json.loads(text)
    assert error["error"] in (code if isinstance(code, tuple) else (code,)), error
    assert isinstance(error["message"], str) and error["message"], error
    await client.nothing_more()  # nothing was published
    await client.close()
    await healthy.still_fine()


# -- the WebSocket handshake: tokens and upgrade requests that are refused

REFUSED = [
    pytest.param(b"", 401, id="no-token"),
    pytest.param(b"?token=", 401, id="empty-token"),
    pytest.param(b"?token=garbage", 401, id="token-garbage"),
    pytest.param(b"?token=a.b.c", 401, id="token-three-garbage-parts"),
    pytest.param(b"?token=" + b"A" * 2000, 401, id="token-long-garbage"),
    pytest.param(
        b"?token=" + token("x", ["*"], ttl=-10, aud=AUDIENCE).encode(), 401, id="token-expired"
    ),
    pytest.param(
        b"?token="
        + token("x", ["*"], secret="another-secret-of-32-bytes-or-more!", aud=AUDIENCE).encode(),
        401,
        id="token-wrong-key",
    ),
    pytest.param(
        b"?token=" + unsigned_token({"alg": "none", "typ": "JWT"}, claims(aud=AUDIENCE)).encode(),
        401,
        id="token-alg-none",
    ),
    pytest.param(
        b"?token=" + unsigned_token({"alg": "None", "typ": "JWT"}, claims(aud=AUDIENCE)).encode(),
        401,
        id="token-alg-None",
    ),
    pytest.param(
        b"?token=" + encode(claims(aud=AUDIENCE), algorithm="HS512").encode(),
        401,
        id="token-hs512-right-secret",
    ),
    pytest.param(
        b"?token=" + encode(claims(aud=AUDIENCE))[:-4].encode() + b"AAAA",
        401,
        id="token-signature-tampered",
    ),
    pytest.param(
        b"?token=" + token("x", ["*"], aud="another-service").encode(), 401, id="token-wrong-aud"
    ),
    pytest.param(
        b"?token=" + token("x", ["*"], aud=["another-service"]).encode(),
        401,
        id="token-aud-list-without-ours",
    ),
    pytest.param(b"?token=" + token("x", ["*"]).encode(), 401, id="token-no-aud"),
    pytest.param(
        b"?token=" + encode({"sub": "x", "channels": ["*"], "aud": AUDIENCE}).encode(),
        401,
        id="token-no-exp",
    ),
    pytest.param(
        b"?token=" + encode(claims(aud=AUDIENCE, exp="tomorrow")).encode(),
        401,
        id="token-exp-not-a-number",
    ),
    pytest.param(
        b"?token=" + encode(claims(aud=AUDIENCE, nbf=int(time.time()) + 3600)).encode(),
        401,
        id="token-not-yet-valid",
    ),
    pytest.param(
        b"?token=" + encode(claims(aud=AUDIENCE, channels=5)).encode(),
        401,
        id="token-channels-not-a-list",
    ),
    pytest.param(
        b"?token=" + encode(claims(aud=AUDIENCE, sub=42)).encode(), 401, id="token-sub-not-a-string"
    ),
    pytest.param(
        b"?token=" + b64(b'["not", "an", "object"]').encode() + b"." + b64(b"{}").encode() + b".",
        401,
        id="token-header-not-an-object",
    ),
]


async def handshake(pushd: PushdUnderTest, request: bytes) -> int:
    """The status of pushd's answer to an upgrade request; a refusal ends the connection."""
    raw = await connect_raw(pushd.port)
    raw.transport.write(request)
    try:
        status, headers, _ = http_answer(await raw.until(b"\r\n\r\n", timeout=5))
        if status == 101:
            assert headers["upgrade"].lower() == "websocket"
        else:  # not upgraded; a 426 names the protocol to upgrade to
            assert headers.get("upgrade", "websocket").lower() == "websocket"
            await with_timeout(raw.lost, 5)
    finally:
        raw.transport.abortConnection()
    return status


@pytest.mark.parametrize(("query", "status"), REFUSED)
@pytest_twisted.ensureDeferred
async def test_handshake_with_a_bad_token(healthy: Healthy, query: bytes, status: int) -> None:
    request = HANDSHAKE % ((query or b"?") + b"&channel=news")
    assert await handshake(healthy.pushd, request) == status
    await healthy.still_fine()


def _bearer(value: str) -> bytes:
    return (HANDSHAKE % b"?channel=news").replace(
        b"\r\n\r\n", b"\r\nAuthorization: Bearer " + value.encode() + b"\r\n\r\n"
    )


@pytest_twisted.ensureDeferred
async def test_bearer_header_with_a_bad_token(healthy: Healthy) -> None:
    bad = token("x", ["*"], secret="another-secret-of-32-bytes-or-more!", aud=AUDIENCE)
    assert await handshake(healthy.pushd, _bearer(bad)) == 401
    assert await handshake(healthy.pushd, _bearer(CLIENT_TOKEN)) == 101  # the control
    await healthy.still_fine()


UPGRADE_GARBAGE = [
    pytest.param(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 99", 400, id="version-99"),
    pytest.param(b"Sec-WebSocket-Version: 13\r\n", b"", 400, id="version-missing"),
    pytest.param(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b"", 400, id="key-missing"),
    pytest.param(b"dGhlIHNhbXBsZSBub25jZQ==", b"short", 400, id="key-not-16-bytes"),
    pytest.param(b"Upgrade: websocket", b"Upgrade: h2c", 426, id="upgrade-not-websocket"),
    pytest.param(b"Connection: Upgrade", b"Connection: close", 400, id="connection-not-upgrade"),
    pytest.param(b"GET /ws", b"POST /ws", 405, id="post"),
    pytest.param(b"", b"", 101, id="control-valid-request"),
]


@pytest.mark.parametrize(("old", "new", "status"), UPGRADE_GARBAGE)
@pytest_twisted.ensureDeferred
async def test_bad_upgrade_request(healthy: Healthy, old: bytes, new: bytes, status: int) -> None:
    request = (HANDSHAKE % WS_QUERY).replace(old, new) if old else HANDSHAKE % WS_QUERY
    assert await handshake(healthy.pushd, request) == status
    await healthy.still_fine()


@pytest_twisted.ensureDeferred
async def test_plain_get_on_the_websocket_endpoint(healthy: Healthy) -> None:
    answer = await raw_exchange(
        healthy.pushd, _request(b"/ws?channel=news&token=" + CLIENT_TOKEN.encode())
    )
    status, _, _ = http_answer(answer)
    assert 400 <= status < 500, answer[:300]
    await healthy.still_fine()


# -- WebSocket frames a client gets an error frame for; the connection stays


def _text(value: Any) -> bytes:
    return frame(0x1, value if isinstance(value, bytes) else json.dumps(value).encode())


def _error(code: str, channel: str | None = None) -> dict[str, Any]:
    return {"type": "error", "code": code, "channel": channel}


BAD_FRAMES = [
    pytest.param(_text(b"{oops"), [_error("bad_json")], id="json-syntax"),
    pytest.param(_text(b""), [_error("bad_json")], id="empty-text"),
    pytest.param(_text(b'{"type": "ping"} x'), [_error("bad_json")], id="json-trailing-garbage"),
    pytest.param(
        _text(b"[" * 30000 + b"]" * 30000),
        [_error("bad_json")],
        id="json-deep-nesting",
    ),
    pytest.param(
        _text(b'{"type": "publish", "channel": "pub.x", "data": NaN}'),
        [_error("bad_json")],
        id="json-nan",
    ),
    pytest.param(
        _text(b'{"type": "publish", "channel": "pub.x", "data": {"x": 1e400}}'),
        [_error("bad_json")],
        id="json-1e400",
    ),
    pytest.param(_text([1, 2]), [_error("bad_request")], id="not-an-object"),
    pytest.param(_text("ping"), [_error("bad_request")], id="a-string"),
    pytest.param(_text({}), [_error("bad_request")], id="no-type"),
    pytest.param(_text({"type": 5}), [_error("bad_request")], id="type-not-a-string"),
    pytest.param(_text({"type": "hello"}), [_error("unknown_type")], id="unknown-type"),
    pytest.param(_text({"type": "x" * 10000}), [_error("unknown_type")], id="unknown-long-type"),
    pytest.param(frame(0x2, b'{"type":"ping"}'), [_error("bad_request")], id="binary-frame"),
    pytest.param(
        _text({"type": "subscribe", "channel": "bad name"}),
        [_error("bad_channel", "bad name")],
        id="subscribe-bad-channel",
    ),
    pytest.param(
        _text({"type": "subscribe"}), [_error("bad_channel")], id="subscribe-without-channel"
    ),
    pytest.param(
        _text({"type": "subscribe", "channel": ["news"]}),
        [_error("bad_channel")],
        id="subscribe-channel-not-a-string",
    ),
    pytest.param(
        _text(b'{"type": "subscribe", "channel": "\\ud800"}'),
        [_error("bad_channel")],
        id="subscribe-channel-lone-surrogate",
    ),
    pytest.param(
        _text({"type": "subscribe", "channel": "news", "since": "garbage"}),
        [_error("bad_since", "news")],
        id="subscribe-since-garbage",
    ),
    pytest.param(
        _text({"type": "subscribe", "channel": "news", "since": 12}),
        [_error("bad_since", "news")],
        id="subscribe-since-a-number",
    ),
    pytest.param(
        _text({"type": "subscribe", "channel": "news", "since": "99999999999999999999-0"}),
        [_error("bad_since", "news")],
        id="subscribe-since-beyond-64-bits",
    ),
    pytest.param(
        _text({"type": "subscribe", "channel": "secret"}),
        [_error("forbidden", "secret")],
        id="subscribe-not-granted",
    ),
    pytest.param(
        _text({"type": "subscribe", "channel": "dm#x,y"}),
        [_error("forbidden", "dm#x,y")],
        id="subscribe-user-channel-of-others",
    ),
    pytest.param(
        _text({"type": "subscribe", "channel": "news"}) * 2,
        [{"type": "subscribed", "channel": "news"}, _error("already_subscribed", "news")],
        id="subscribe-twice",
    ),
    pytest.param(
        _text({"type": "unsubscribe", "channel": "bad name"}),
        [_error("bad_channel", "bad name")],
        id="unsubscribe-bad-channel",
    ),
    pytest.param(
        _text({"type": "publish", "channel": "news", "data": 1}),
        [_error("forbidden", "news")],
        id="publish-not-granted",
    ),
    pytest.param(
        _text({"type": "publish", "channel": "pub.x"}),
        [_error("bad_request", "pub.x")],
        id="publish-without-data",
    ),
    pytest.param(
        _text({"type": "publish", "channel": "pub.x", "data": "x" * (MAX_MESSAGE_SIZE + 1)}),
        [_error("too_large", "pub.x")],
        id="publish-data-too-large",
    ),
    pytest.param(
        _text(b'{"type": "publish", "channel": "pub.x", "data": "\\udc00"}'),
        [_error("bad_json", "pub.x")],
        id="publish-lone-surrogate",
    ),
]


@pytest.mark.parametrize(("sent", "expected"), BAD_FRAMES)
@pytest_twisted.ensureDeferred
async def test_bad_frame_gets_an_error_frame(
    healthy: Healthy, sent: bytes, expected: list[dict[str, Any]]
) -> None:
    raw = await open_raw(healthy.pushd, WS_QUERY)
    raw.transport.write(sent + _text({"type": "ping"}))
    pong = {"type": "pong"}
    # Error frames answer at once, so before the pong; a `subscribed` may come later (Redis).
    await wait_for(lambda: pong in texts(raw) or raw.lost.called, timeout=5, what="the pong")
    if any(want["type"] != "error" for want in expected):
        await wait_for(lambda: len(texts(raw)) > len(expected), timeout=5, what="the frames")
    assert not raw.lost.called, "pushd dropped the connection"
    got = sorted((f for f in texts(raw) if f != pong), key=lambda f: (f["type"], f.get("code")))
    expected = sorted(expected, key=lambda f: (f["type"], f.get("code")))
    assert len(got) == len(expected), got
    for want, frame_got in zip(expected, got, strict=True):
        for key, value in want.items():
            assert frame_got.get(key) == value, (want, frame_got)
        if want["type"] == "error":
            assert isinstance(frame_got["message"], str) and frame_got["message"]
    assert not any(opcode == 0x8 for opcode, _ in server_frames(raw.data))
    raw.transport.loseConnection()
    await healthy.still_fine()


# -- WebSocket protocol violations: a close frame with the RFC 6455 code

VIOLATIONS = [
    pytest.param(_text(b'{"type":"ping","x":"\xff"}'), 1007, id="invalid-utf8"),
    pytest.param(_text(b'{"type":"ping","x":"\xed\xa0\x80"}'), 1007, id="utf8-surrogate"),
    pytest.param(_text(b'{"type":"ping","x":"\xc0\xaf"}'), 1007, id="overlong-utf8"),
    pytest.param(
        frame(0x1, b'{"type":"ping","x":"\xe2', fin=False) + frame(0x0, b'"}'),
        1007,
        id="invalid-utf8-across-fragments",
    ),
    # The frame limit is a little over --max-message-size, for a publish frame's own fields.
    pytest.param(_text(b"x" * (2 * MAX_MESSAGE_SIZE)), 1009, id="oversize-frame"),
    pytest.param(
        frame(0x1, b"x" * MAX_MESSAGE_SIZE, fin=False) + frame(0x0, b"x" * MAX_MESSAGE_SIZE),
        1009,
        id="oversize-fragmented-message",
    ),
    pytest.param(frame(0x3, b"?"), 1002, id="reserved-data-opcode"),
    pytest.param(frame(0xB, b"?"), 1002, id="reserved-control-opcode"),
    pytest.param(b"\xc1\x80abcd", 1002, id="rsv1-without-extension"),
    pytest.param(frame(0x1, b'{"type":"ping"}', masked=False), 1002, id="unmasked"),
    pytest.param(frame(0x0, b'{"type":"ping"}'), 1002, id="continuation-without-start"),
    pytest.param(frame(0x9, b"ping", fin=False), 1002, id="fragmented-ping"),
    pytest.param(frame(0x9, b"p" * 126), 1002, id="ping-over-125-bytes"),
    # Autobahn answers these with a close frame and drops the connection in the
    # same turn: the frame goes out only because pushd sends it at once
    # (PushdServerProtocol.sendData); from Twisted's buffer, the drop discarded it.
    pytest.param(frame(0x8, b"\x03\xe7"), 1002, id="close-code-999"),
    pytest.param(frame(0x8, b"\x03\xe8\xff"), 1007, id="close-reason-invalid-utf8"),
]


@pytest.mark.parametrize(("sent", "code"), VIOLATIONS)
@pytest_twisted.ensureDeferred
async def test_protocol_violation_closes_with_a_code(
    healthy: Healthy, sent: bytes, code: int
) -> None:
    raw = await open_raw(healthy.pushd, WS_QUERY)
    raw.transport.write(sent)

    def closes() -> list[bytes]:
        return [payload for opcode, payload in server_frames(raw.data) if opcode == 0x8]

    await wait_for(lambda: closes() or raw.lost.called, timeout=5, what="a close frame")
    raw.transport.loseConnection()
    assert closes(), "a bare TCP drop, without a close frame"
    assert struct.unpack("!H", closes()[0][:2])[0] == code
    await healthy.still_fine()


@pytest_twisted.ensureDeferred
async def test_fragmented_message_works(healthy: Healthy) -> None:
    raw = await open_raw(healthy.pushd, WS_QUERY)
    message = b'{"type":"subscribe","channel":"news"}'
    raw.transport.write(
        frame(0x1, message[:5], fin=False)
        + frame(0x0, message[5:6], fin=False)
        + frame(0x0, message[6:])
    )
    await wait_for(lambda: texts(raw), timeout=5, what="the subscription")
    (subscribed,) = texts(raw)
    assert subscribed == {**subscribed, "type": "subscribed", "channel": "news", "recovered": False}
    msg_id = await healthy.pushd.publish("news", "after fragments")
    await wait_for(lambda: len(texts(raw)) == 2, timeout=5, what="the message")
    assert texts(raw)[1]["id"] == msg_id
    raw.transport.loseConnection()
    await healthy.still_fine()


# -- bad subscriptions in the URL: the connection opens with an error frame

URL_SUBSCRIPTIONS = [
    pytest.param(b"channel=bad%20name", _error("bad_channel", "bad name"), id="bad-channel"),
    pytest.param(b"channel=%FF", _error("bad_channel", "\ufffd"), id="channel-not-utf8"),
    pytest.param(b"channel=news&since=garbage", _error("bad_since", "news"), id="bad-since"),
    pytest.param(b"channel=secret", _error("forbidden", "secret"), id="not-granted"),
    pytest.param(b"channel=dm%23x,y", _error("forbidden", "dm#x,y"), id="user-channel-of-others"),
]


@pytest.mark.parametrize(("query", "expected"), URL_SUBSCRIPTIONS)
@pytest_twisted.ensureDeferred
async def test_bad_subscription_in_the_url(
    healthy: Healthy, query: bytes, expected: dict[str, Any]
) -> None:
    raw = await open_raw(healthy.pushd, WS_QUERY + b"&" + query)
    raw.transport.write(_text({"type": "ping"}))
    await wait_for(lambda: {"type": "pong"} in texts(raw), timeout=5, what="the pong")
    got = texts(raw)
    assert len(got) == 2, got
    for key, value in expected.items():
        assert got[0].get(key) == value, got
    raw.transport.loseConnection()
    await healthy.still_fine()

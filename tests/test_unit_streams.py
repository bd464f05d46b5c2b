"""The plain-HTTP subscriber streams (pushd.transports.sse, .ndjson, .stream)
over the site's channel on a StringTransport: the head, the `subscribed`
events, messages, keep-alives on the clock, resumption with `since` and
Last-Event-ID (and the cursor that makes one id resume many channels), the
refusals, and what ends a stream. The cursor's codec has properties of its own.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pushd.message import format_id
from pushd.transports.stream import decode_cursor, encode_cursor
from pushd.web.errors import ApiError
from tests.test_unit_harness import Conn, Node, Response, get, parse_head

SECRET = "a-secret-of-32-bytes-or-more-for-hs256"


class Stream:
    """An open stream: its head, and its body so far (the chunks, decoded)."""

    def __init__(self, node: Node, target: str, headers: dict[str, str] | None = None) -> None:
        self.node = node
        self.conn: Conn = node.connect()
        self.conn.send(get(target, headers))
        parsed = parse_head(self.conn.raw())
        assert parsed is not None, self.conn.raw()
        self.head: Response = parsed[0]
        self._at = parsed[1]

    @property
    def ended(self) -> bool:
        return self._chunks()[1]

    def body(self) -> bytes:
        return self._chunks()[0]

    def _chunks(self) -> tuple[bytes, bool]:
        data = self.conn.raw()[self._at :]
        if self.head.header("transfer-encoding") != "chunked":
            return data, True
        out = b""
        while data:
            line_end = data.find(b"\r\n")
            size = int(data[:line_end], 16)
            if size == 0:
                return out, True
            out += data[line_end + 2 : line_end + 2 + size]
            data = data[line_end + 2 + size + 2 :]
        return out, False

    def events(self) -> list[dict[str, str]]:
        """SSE events: each a dict of its fields (a comment as ":")."""
        out = []
        for block in self.body().decode().split("\n\n"):
            if not block:
                continue
            event: dict[str, str] = {}
            for line in block.split("\n"):
                name, _, value = line.partition(":")
                event[name or ":"] = value[1:] if value.startswith(" ") else value
            out.append(event)
        return out

    def lines(self) -> list[Any]:
        """NDJSON lines, parsed (an empty line as None)."""
        text = self.body().decode()
        assert text == "" or text.endswith("\n"), text
        return [json.loads(line) if line else None for line in text.split("\n")[:-1]]


def message(channel: str, msg_id: str | None, data: Any) -> dict[str, Any]:
    return {"type": "message", "channel": channel, "id": msg_id, "data": data}


def subscribed(channel: str, position: str | None = None, recovered: bool = False) -> Any:
    return {"type": "subscribed", "channel": channel, "recovered": recovered, "position": position}


@pytest.fixture
def node() -> Node:
    return Node()


# -- SSE


def test_sse_head_subscribed_events_and_messages(node: Node) -> None:
    old = node.publish("a", b'"old"')
    sse = Stream(node, "/sse?channel=a")
    assert sse.head.status == 200
    assert sse.head.header("content-type") == "text/event-stream"
    assert sse.head.header("cache-control") == "no-cache"
    assert sse.head.header("x-accel-buffering") == "no"
    new = node.publish("a", b'{"n":1}')
    ok, ack, live, msg = sse.events()
    assert ok == {":": "ok"}
    assert ack["event"] == "subscribed" and "id" not in ack
    assert json.loads(ack["data"]) == subscribed("a", old)
    assert live["event"] == "subscribed" and live["id"] == old
    assert json.loads(live["data"]) == {"type": "subscribed", "channels": {"a": old}}
    assert msg["id"] == new and json.loads(msg["data"]) == message("a", new, {"n": 1})
    assert not sse.ended


def test_sse_on_a_quiet_channel_resumes_from_the_beginning(node: Node) -> None:
    sse = Stream(node, "/sse?channel=a")
    _, ack, live = sse.events()
    assert json.loads(ack["data"]) == subscribed("a", None)
    assert live["id"] == "0-0"


def test_sse_keepalives_on_the_clock_and_none_once_every_stream_is_gone(node: Node) -> None:
    sse = Stream(node, "/sse?channel=a")
    before = len(sse.events())
    node.advance(14.9)
    assert len(sse.events()) == before
    node.advance(0.2)
    assert sse.events()[-1] == {":": "keep-alive"}
    node.advance(15)
    assert sse.events()[-2:] == [{":": "keep-alive"}] * 2
    sse.conn.close()
    assert node.reactor.getDelayedCalls() == []
    assert node.hub.channels() == {}


def test_sse_several_channels_share_one_cursor(node: Node) -> None:
    a0 = node.publish("a", b"0")
    sse = Stream(node, "/sse?channel=a&channel=b")
    live = sse.events()[-1]
    assert decode_cursor(live["id"], ["a", "b"]) == {"a": a0, "b": "0-0"}
    b0 = node.publish("b", b"1")
    a1 = node.publish("a", b"2")
    ids = [e["id"] for e in sse.events()[-2:]]
    assert decode_cursor(ids[0], ["a", "b"]) == {"a": a0, "b": b0}
    assert decode_cursor(ids[1], ["a", "b"]) == {"a": a1, "b": b0}
    # The cursor is another URL's: it resumes nothing there.
    assert decode_cursor(ids[1], ["b", "a"]) == {}


def test_sse_resumes_every_channel_with_last_event_id(node: Node) -> None:
    first = Stream(node, "/sse?channel=a&channel=b")
    a = [node.publish("a", b"%d" % n) for n in range(2)]
    b = [node.publish("b", b"%d" % n) for n in range(2)]
    cursor = first.events()[-2]["id"]  # after a's two and b's first
    first.conn.close()
    a.append(node.publish("a", b"2"))
    again = Stream(node, "/sse?channel=a&channel=b", {"Last-Event-ID": cursor})
    events = [e for e in again.events() if "data" in e]
    acks = [json.loads(e["data"]) for e in events if e.get("event") == "subscribed"]
    assert acks[:2] == [subscribed("a", a[2], True), subscribed("b", b[1], True)]
    replayed = [json.loads(e["data"])["id"] for e in events if "event" not in e]
    assert replayed == [a[2], b[1]]


@pytest.mark.parametrize(
    "how",
    [
        lambda since: ("/sse?channel=a", {"Last-Event-ID": since}),
        lambda since: (f"/sse?channel=a&since={since}", None),
        lambda since: (f"/sse?channel=a&last_event_id={since}", None),
        lambda since: ("/sse?channel=a&since=nonsense", {"Last-Event-ID": since}),
    ],
    ids=["header", "since", "last_event_id", "header-first"],
)
def test_sse_resumes_one_channel_from_an_id(node: Node, how: Any) -> None:
    ids = [node.publish("a", b"%d" % n) for n in range(3)]
    target, headers = how(ids[0])
    sse = Stream(node, target, headers)
    assert sse.head.status == 200, sse.body()
    data = [json.loads(e["data"]) for e in sse.events() if "data" in e]
    assert data[0] == subscribed("a", ids[2], True)
    assert [d["id"] for d in data[1:3]] == ids[1:]
    assert [e.get("id") for e in sse.events() if "event" not in e and "data" in e] == ids[1:]


def test_sse_a_foreign_message_has_no_id(node: Node) -> None:
    sse = Stream(node, "/sse?channel=a")
    node.hub.receive("a", b'"from elsewhere"')
    node.advance(0)
    last = sse.events()[-1]
    assert "id" not in last and json.loads(last["data"]) == message("a", None, "from elsewhere")


def test_sse_the_personal_channel_beside_one_channel_has_no_id() -> None:
    node = Node(token_secret=SECRET)
    tok = jwt.encode({"exp": int(time.time()) + 60, "sub": "al", "channels": ["*"]}, SECRET)
    sse = Stream(node, f"/sse?channel=a&token={tok}")
    acks = [json.loads(e["data"]) for e in sse.events() if e.get("event") == "subscribed"]
    assert [a.get("channel") for a in acks] == ["a", "user#al", None]
    personal = node.publish("user#al", b"1")
    mine = node.publish("a", b"2")
    p, a = sse.events()[-2:]
    assert "id" not in p and json.loads(p["data"])["id"] == personal
    assert a["id"] == mine


# -- NDJSON


def test_ndjson_lines_and_keepalives(node: Node) -> None:
    old = node.publish("a", b"0")
    stream = Stream(node, f"/stream?channel=a&since={old}")
    assert stream.head.status == 200
    assert stream.head.header("content-type") == "application/x-ndjson"
    assert stream.lines() == [subscribed("a", old, True)]
    new = node.publish("a", b'{"k":[true,null]}')
    node.advance(15)
    assert stream.lines() == [
        subscribed("a", old, True),
        message("a", new, {"k": [True, None]}),
        None,
    ]


def test_ndjson_replays_then_goes_live(node: Node) -> None:
    ids = [node.publish("a", b"%d" % n) for n in range(3)]
    stream = Stream(node, "/stream?channel=a&since=0-0")
    live = node.publish("a", b"3")
    lines = stream.lines()
    assert lines[0]["type"] == "subscribed" and lines[0]["position"] == ids[-1]
    assert [line["id"] for line in lines[1:]] == [*ids, live]


# -- refusals, before the stream starts


@pytest.mark.parametrize("path", ["/sse", "/stream"])
@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("", 400, "bad_channel"),
        ("?channel=a%20b", 400, "bad_channel"),
        ("?channel=a&since=yesterday", 400, "bad_since"),
        ("?channel=a&since=1.x.y", 400, "bad_since"),
        ("?channel=a&channel=b&channel=c", 400, "too_many_subscriptions"),
    ],
)
def test_a_refused_stream_is_a_json_error(path: str, query: str, status: int, code: str) -> None:
    node = Node(max_subscriptions=2)
    stream = Stream(node, path + query)
    answer = stream.conn.one()
    assert answer.contract[0] == status and answer.json()["error"] == code, answer
    assert node.hub.channels() == {}


def test_tokens_on_streams() -> None:
    node = Node(token_secret=SECRET)
    assert Stream(node, "/sse?channel=a").conn.one().contract[0] == 401
    tok = jwt.encode({"exp": int(time.time()) + 60, "channels": ["a"]}, SECRET)
    refused = Stream(node, f"/stream?channel=a&channel=b&token={tok}").conn.one()
    assert refused.contract[0] == 403 and refused.json()["error"] == "forbidden"
    ok = Stream(node, "/stream?channel=a", {"Authorization": f"Bearer {tok}"})
    assert ok.head.status == 200 and ok.lines() == [subscribed("a")]


def test_an_expiring_token_ends_the_stream_on_the_clock() -> None:
    node = Node(token_secret=SECRET)
    exp = int(time.time()) + 600
    tok = jwt.encode({"exp": exp, "channels": ["*"]}, SECRET)
    stream = Stream(node, f"/stream?channel=a&token={tok}")
    node.advance(exp - node.reactor.seconds() - 1)
    assert not stream.ended
    node.advance(2)
    assert stream.ended and node.hub.channels() == {}


def test_connections_per_address_count_streams_too() -> None:
    node = Node(max_connections_per_ip=1)
    first = Stream(node, "/sse?channel=a")
    assert Stream(node, "/stream?channel=a").conn.one().contract[0] == 429
    first.conn.close()
    assert Stream(node, "/stream?channel=a").head.status == 200


def test_cors_on_streams() -> None:
    node = Node(allowed_origin=("https://app.example",))
    sse = Stream(node, "/sse?channel=a", {"Origin": "https://app.example"})
    assert sse.head.header("access-control-allow-origin") == "https://app.example"
    conn = node.connect()
    conn.send(get("/sse", {"Origin": "https://app.example"}).replace(b"GET", b"OPTIONS", 1))
    preflight = conn.one()
    assert preflight.status == 204
    assert "Last-Event-ID" in (preflight.header("access-control-allow-headers") or "")
    refused = Stream(node, "/sse?channel=a", {"Origin": "https://evil.example"}).conn.one()
    assert refused.contract[0] == 403


# -- what ends a stream


def test_destroying_the_channel_ends_the_stream(node: Node) -> None:
    stream = Stream(node, "/stream?channel=a")
    assert node.hub.control({"cmd": "destroy", "channel": "a"}) == 1
    assert stream.ended and node.hub.channels() == {}


def test_stopping_ends_every_stream(node: Node) -> None:
    streams = [Stream(node, "/sse?channel=a"), Stream(node, "/stream?channel=b")]
    for resource in node.site.streams:
        resource.end_all()
    assert all(s.ended for s in streams) and node.hub.channels() == {}


def test_a_stream_that_stops_reading_is_cut_off_past_the_bound() -> None:
    node = Node(max_send_buffer=1000)
    stream = Stream(node, "/stream?channel=a")
    # Twisted's buffer is full: the transport pauses its producer, the Stream.
    (open_stream,) = node.site.streams[1]._streams
    assert stream.conn.transport.producer is open_stream
    stream.conn.transport.producer.pauseProducing()
    assert open_stream._paused
    payload = b'"' + b"x" * 200 + b'"'
    for _ in range(3):
        node.publish("a", payload)
    assert not stream.conn.transport.aborted
    node.publish("a", payload)
    assert stream.conn.transport.aborted and node.hub.channels() == {}
    assert node.service.metrics.slow_consumers.labels("stream")._value.get() == 1


def test_a_client_gone_leaves_nothing(node: Node) -> None:
    stream = Stream(node, "/sse?channel=a&channel=b")
    stream.conn.close()
    assert node.hub.channels() == {}
    assert node.reactor.getDelayedCalls() == []
    assert all(not r._streams for r in node.site.streams)


# -- the cursor


_ids = st.builds(format_id, st.integers(0, 2**48), st.integers(0, 2**20))
_channels = st.lists(
    st.from_regex(r"[A-Za-z0-9_.:@=+-]{1,20}(#[a-z0-9]{1,8})?", fullmatch=True),
    min_size=1,
    max_size=8,
    unique=True,
)


@settings(max_examples=100, deadline=None)
@given(channels=_channels, data=st.data())
def test_the_cursor_round_trips(channels: list[str], data: st.DataObject) -> None:
    last = {c: data.draw(_ids) for c in channels if data.draw(st.booleans())}
    cursor = encode_cursor(last, channels)
    assert cursor.isascii() and all(ch.isalnum() or ch in "-_." for ch in cursor)
    assert decode_cursor(cursor, channels) == last


@settings(max_examples=50, deadline=None)
@given(channels=_channels, msg_id=_ids)
def test_a_plain_id_resumes_every_channel(channels: list[str], msg_id: str) -> None:
    assert decode_cursor(msg_id, channels) == dict.fromkeys(channels, msg_id)


@settings(max_examples=50, deadline=None)
@given(channels=_channels)
def test_a_cursor_of_other_channels_resumes_none(channels: list[str]) -> None:
    last = dict.fromkeys(channels, "5-0")
    other = [*channels, "zz-other"]
    assert decode_cursor(encode_cursor(last, channels), other) == {}
    if len(channels) > 1:
        assert decode_cursor(encode_cursor(last, channels), channels[::-1]) == {}


def test_a_client_built_cursor_with_the_unchecked_mark() -> None:
    assert decode_cursor("1._.5.7-2.", ["a", "b", "c"]) == {"a": "5-0", "b": "7-2"}


def test_the_former_json_cursor_is_still_read() -> None:
    old = base64.urlsafe_b64encode(json.dumps({"a": "5-1", "x": "9-0"}).encode()).decode()
    assert decode_cursor(old.rstrip("="), ["a", "b"]) == {"a": "5-1"}


@pytest.mark.parametrize(
    "garbage",
    [
        "2.abc.5",
        "1.abc",
        "1.abc.5-x",
        "1.abc.-5",
        "1.abc.5.5-0-0",
        "!!!!",
        base64.urlsafe_b64encode(b"[1, 2]").decode(),
        base64.urlsafe_b64encode(b'{"a": 5}').decode(),
        base64.urlsafe_b64encode(b'{"a": "later"}').decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    ],
)
def test_a_malformed_cursor_is_bad_since(garbage: str) -> None:
    with pytest.raises(ApiError) as e:
        decode_cursor(garbage, ["a", "b"])
    assert (e.value.status, e.value.code) == (400, "bad_since")


@settings(max_examples=100, deadline=None)
@given(garbage=st.text(max_size=40), channels=_channels)
def test_any_text_decodes_to_ids_of_the_channels_or_is_bad_since(
    garbage: str, channels: list[str]
) -> None:
    try:
        cursor = decode_cursor(garbage, channels)
    except ApiError as e:
        assert e.code == "bad_since"
        return
    assert set(cursor) <= set(channels)
    for msg_id in cursor.values():
        ms, _, seq = msg_id.partition("-")
        assert ms.isdigit() and seq.isdigit()


@pytest.mark.parametrize("since", ["\u0661\u0662\u0663-0", "\uff11-0", "1-\u0660"])
def test_an_id_of_non_ascii_digits_is_bad_since(node: Node, since: str) -> None:
    from urllib.parse import quote

    with pytest.raises(ApiError):
        decode_cursor(since, ["a"])
    answer = Stream(node, f"/stream?channel=a&since={quote(since)}").conn.one()
    assert answer.contract[0] == 400


# -- the stream's own connection (pushd.transports.stream.StreamConnection)


def test_an_open_stream_holds_no_twisted_web_channel_nor_request(node: Node) -> None:
    import gc
    import weakref

    from pushd.transports.stream import StreamConnection

    stream = Stream(node, "/sse?channel=a")
    assert isinstance(stream.conn.transport.protocol, StreamConnection)
    assert not node.site.channels  # the site let it go, as after an upgrade
    channel = weakref.ref(stream.conn.protocol)
    stream.conn.protocol = None
    gc.collect()
    assert channel() is None  # nothing else held twisted.web's channel (and its request)
    node.publish("a", b'"after"')
    assert b'"data":"after"' in stream.body()
    stream.conn.close()
    assert node.hub.channels() == {} and not node.site.streams[0].connections()


def test_an_http_1_0_stream_is_not_chunked_and_ends_with_its_connection(node: Node) -> None:
    conn = node.connect()
    conn.send(b"GET /stream?channel=a HTTP/1.0\r\nHost: x\r\n\r\n")
    node.publish("a", b"1")
    head, _, body = conn.raw().partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower() and b"chunked" not in head.lower()
    lines = body.splitlines()
    assert lines[0].startswith(b'{"type":"subscribed"') and lines[-1].endswith(b',"data":1}')
    node.hub.control({"cmd": "destroy", "channel": "a"})
    assert conn.transport.disconnecting


def test_a_stream_client_that_keeps_talking_is_cut_off(node: Node) -> None:
    from pushd.transports.stream import StreamConnection

    stream = Stream(node, "/sse?channel=a")
    stream.conn.send(b"x" * StreamConnection.MAX_TRAILING)
    assert not stream.conn.transport.aborted
    stream.conn.send(b"x")
    assert stream.conn.transport.aborted


def test_a_head_request_gets_a_head_and_no_stream(node: Node) -> None:
    conn = node.connect()
    conn.send(b"HEAD /sse?channel=a HTTP/1.1\r\nHost: x\r\n\r\n")
    (response,) = conn.responses()
    assert response.status == 200 and response.header("content-type") == "text/event-stream"
    assert node.hub.channels() == {} and not node.site.streams[0].connections()

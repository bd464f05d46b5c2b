"""The WebSocket handlers (pushd.transports.websocket) on the real frame path
without a network: a client's opening handshake and masked frames fed to the
site's channel over a StringTransport (Autobahn takes the transport over at the
upgrade), the server's frames parsed from what it wrote; time on the node's
MemoryReactorClock (Autobahn's own timers moved onto it: see the harness).
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from twisted.internet.defer import Deferred, fail

from pushd.broker import BrokerUnavailable, OutcomeUnknown
from pushd.transports.websocket import DROP_LINGER
from tests.test_unit_harness import Node, WsConn, client_frame

SECRET = "a-secret-of-32-bytes-or-more-for-hs256"


def token(node: Node, **claims: Any) -> str:
    """A subscriber token valid for an hour of the wall clock (pyjwt checks `exp` on it)."""
    body = {"exp": int(time.time()) + 3600, "channels": ["*"], **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


def error(code: str, channel: str | None = None, **extra: Any) -> dict[str, Any]:
    """The `error` frame's shape, its message left out (see `errors_of`)."""
    out = {"type": "error", "code": code, **extra}
    if channel is not None:
        out["channel"] = channel
    return out


def errors_of(events: list[Any]) -> list[dict[str, Any]]:
    out = []
    for e in events:
        assert e["type"] == "error", events
        assert isinstance(e.pop("message"), str) and e.get("channel", "") is not None
        out.append(e)
    return out


@pytest.fixture
def node() -> Node:
    return Node()


def subscribed(channel: str, position: str | None = None, recovered: bool = False) -> Any:
    return {"type": "subscribed", "channel": channel, "recovered": recovered, "position": position}


# -- the handshake and the URL's channels


def test_the_urls_channels_are_subscribed_then_messages_flow(node: Node) -> None:
    old = node.publish("b", b'"old"')
    ws = node.websocket("/ws?channel=a&channel=b")
    assert ws.status == 101 and ws.handshake.header("sec-websocket-accept") == ws.accept
    assert ws.take() == [subscribed("a"), subscribed("b", old)]
    msg = node.publish("a", b'{"x":1}')
    assert ws.take() == [{"type": "message", "channel": "a", "id": msg, "data": {"x": 1}}]


def test_the_urls_since_replays_and_recovers(node: Node) -> None:
    ids = [node.publish("a", b"%d" % n) for n in range(3)]
    ws = node.websocket(f"/ws?channel=a&since={ids[0]}")
    first, *replay = ws.take()
    assert first == subscribed("a", ids[-1], recovered=True)
    assert [(m["id"], m["data"]) for m in replay] == [(ids[1], 1), (ids[2], 2)]


def test_a_fan_out_sends_the_same_bytes_to_every_subscriber(node: Node) -> None:
    clients = [node.websocket("/ws?channel=a") for _ in range(3)]
    for ws in clients:
        ws.transport.clear()
    node.publish("a", b'"x"')
    sent = {ws.raw() for ws in clients}
    assert len(sent) == 1 and b'"data":"x"' in sent.pop()


def test_a_refused_origin_gets_a_403_handshake() -> None:
    node = Node(allowed_origin=("https://good.example",))
    bad = node.websocket("/ws?channel=a", {"Origin": "https://evil.example"})
    assert bad.status == 403 and bad.events() == []
    good = node.websocket("/ws?channel=a", {"Origin": "https://good.example"})
    assert good.status == 101


def test_connections_per_address_are_limited_and_released() -> None:
    node = Node(max_connections_per_ip=2)
    first = node.websocket("/ws")
    node.websocket("/ws")
    assert node.websocket("/ws").status == 429
    assert node.websocket("/ws", host="10.0.0.2").status == 101  # another address
    first.close()
    assert node.websocket("/ws").status == 101


def test_a_bad_token_is_refused_at_the_handshake() -> None:
    node = Node(token_secret=SECRET)
    assert node.websocket("/ws?token=nonsense").status == 401
    wrong = jwt.encode({"exp": int(time.time()) + 60}, SECRET + "-other", algorithm="HS256")
    assert node.websocket(f"/ws?token={wrong}").status == 401


def test_a_request_for_ws_that_does_not_upgrade_gets_json_426(node: Node) -> None:
    conn = node.connect()
    conn.send(b"GET /ws HTTP/1.1\r\nHost: pushd\r\n\r\n")
    answer = conn.one()
    assert answer.contract[0] == 426 and answer.json()["error"] == "upgrade_required"


# -- client frames


def test_subscribe_and_unsubscribe_frames(node: Node) -> None:
    ws = node.websocket()
    ws.json({"type": "subscribe", "channel": "a"})
    assert ws.take() == [subscribed("a")]
    ws.json({"type": "subscribe", "channel": "a"})
    assert errors_of(ws.take()) == [error("already_subscribed", "a")]
    ws.json({"type": "unsubscribe", "channel": "a"})
    assert ws.take() == [{"type": "unsubscribed", "channel": "a"}]
    assert node.hub.count("a") == 0
    node.publish("a", b"1")
    assert ws.take() == []
    # Leaving a channel the client is not in says the same.
    ws.json({"type": "unsubscribe", "channel": "never"})
    assert ws.take() == [{"type": "unsubscribed", "channel": "never"}]


def test_subscribe_with_since_in_a_frame(node: Node) -> None:
    ids = [node.publish("a", b"%d" % n) for n in range(2)]
    ws = node.websocket()
    ws.json({"type": "subscribe", "channel": "a", "since": ids[0]})
    ack, replayed = ws.take()
    assert ack == subscribed("a", ids[1], recovered=True) and replayed["id"] == ids[1]


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ({"type": "subscribe"}, error("bad_channel")),
        ({"type": "subscribe", "channel": 5}, error("bad_channel")),
        ({"type": "subscribe", "channel": "a b"}, error("bad_channel", "a b")),
        ({"type": "subscribe", "channel": "x" * 300}, error("bad_channel")),
        ({"type": "subscribe", "channel": "bad\u0007"}, error("bad_channel")),
        ({"type": "subscribe", "channel": "a", "since": "soon"}, error("bad_since", "a")),
        ({"type": "subscribe", "channel": "a", "since": 12}, error("bad_since", "a")),
        ({"type": "subscribe", "channel": "dm#alice,bob"}, error("forbidden", "dm#alice,bob")),
        ({"type": "unsubscribe", "channel": ""}, error("bad_channel", "")),
        ({"type": "publish", "channel": "a", "data": 1}, error("forbidden", "a")),
        ({"type": "nope"}, error("unknown_type")),
        ({"type": 7}, error("bad_request")),
        ({"channel": "a"}, error("bad_request")),
        ([1, 2], error("bad_request")),
        ("text", error("bad_request")),
    ],
    ids=lambda v: json.dumps(v)[:40] if not isinstance(v, dict) or "type" in v else None,
)
def test_a_bad_frame_gets_an_error_and_the_connection_stays(
    node: Node, frame: Any, expected: dict[str, Any]
) -> None:
    ws = node.websocket()
    ws.json(frame)
    assert errors_of(ws.take()) == [expected]
    ws.json({"type": "ping"})
    assert ws.take() == [{"type": "pong"}]
    assert ws.close_code() is None and node.hub.channels() == {}


@pytest.mark.parametrize(
    "payload",
    [b"{", b"", b"{'a': 1}", b'{"type": NaN}', b'{"type": "ping", "n": 1e400}', b"\xef\xbb\xbf{}"],
    ids=["cut", "empty", "python", "nan", "huge-number", "bom"],
)
def test_a_frame_that_is_not_strict_json_is_bad_json(node: Node, payload: bytes) -> None:
    ws = node.websocket()
    ws.send(client_frame(payload))
    assert errors_of(ws.take()) == [error("bad_json")]
    assert ws.close_code() is None


def test_an_unknown_type_is_echoed_at_most_64_characters(node: Node) -> None:
    ws = node.websocket()
    ws.json({"type": "z" * 500})
    (frame,) = ws.take()
    assert frame["code"] == "unknown_type" and "z" * 64 in frame["message"]
    assert "z" * 65 not in frame["message"]


def test_a_binary_frame_is_refused(node: Node) -> None:
    ws = node.websocket()
    ws.send(client_frame(b'{"type":"ping"}', opcode=0x2))
    assert errors_of(ws.take()) == [error("bad_request")]


def test_fragments_are_one_frame(node: Node) -> None:
    ws = node.websocket()
    ws.send(
        client_frame(b'{"type":', fin=False),
        client_frame(b'"ping"}', opcode=0x0),
    )
    assert ws.take() == [{"type": "pong"}]


def test_a_frame_in_pieces_of_one_byte(node: Node) -> None:
    ws = node.websocket()
    frame = client_frame(b'{"type":"subscribe","channel":"a"}')
    ws.send(*(frame[n : n + 1] for n in range(len(frame))))
    assert ws.take() == [subscribed("a")]


def test_too_many_subscriptions() -> None:
    node = Node(max_subscriptions=2)
    ws = node.websocket("/ws?channel=a")
    ws.json({"type": "subscribe", "channel": "b"})
    ws.json({"type": "subscribe", "channel": "c"})
    *acks, refused = ws.take()
    assert acks == [subscribed("a"), subscribed("b")]
    assert errors_of([refused]) == [error("too_many_subscriptions", "c")]
    # Subscribing again to one it has is still "already".
    ws.json({"type": "subscribe", "channel": "a"})
    assert errors_of(ws.take()) == [error("already_subscribed", "a")]


# -- protocol violations close with a code


def test_invalid_utf8_closes_with_1007(node: Node) -> None:
    ws = node.websocket()
    ws.send(client_frame(b'{"type":"\xff"}'))
    assert ws.close_code() == 1007


def test_a_frame_over_the_limit_closes_with_1009() -> None:
    node = Node(max_message_size=100)
    ws = node.websocket()
    ws.send(client_frame(b" " * (100 + 1024 + 1)))
    assert ws.close_code() == 1009


def test_an_unmasked_frame_closes_with_1002(node: Node) -> None:
    ws = node.websocket()
    ws.send(b"\x81\x0f" + b'{"type":"ping"}')
    assert ws.close_code() == 1002


# -- publishing


@pytest.fixture
def grant() -> Node:
    return Node(token_secret=SECRET, publish_rate=1, publish_burst=2)


def publisher(node: Node, **claims: Any) -> WsConn:
    ws = node.websocket(f"/ws?token={token(node, publish=['a', 'dm#*'], **claims)}")
    assert ws.status == 101
    ws.take()  # the personal channel's `subscribed`, with a `sub`
    return ws


def test_publish_with_a_grant_reaches_subscribers(grant: Node) -> None:
    listener = grant.websocket(f"/ws?channel=a&token={token(grant)}")
    assert listener.take() == [subscribed("a")]
    ws = publisher(grant)
    ws.json({"type": "publish", "channel": "a", "data": {"n": [1, 2]}})
    assert ws.take() == []  # no answer to a publish that went through
    (msg,) = listener.take()
    assert msg["data"] == {"n": [1, 2]} and msg["channel"] == "a"
    assert grant.broker.history("a", "0-0", None).result.messages[0][1] == b'{"n":[1,2]}'


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ({"type": "publish", "channel": "a"}, error("bad_request", "a")),
        ({"type": "publish", "channel": "b", "data": 1}, error("forbidden", "b")),
        ({"type": "publish", "channel": "dm#bob", "data": 1}, error("forbidden", "dm#bob")),
        ({"type": "publish", "channel": "a", "data": "\ud800"}, error("bad_json", "a")),
        ({"type": "publish", "channel": "a", "data": "x" * 200}, error("too_large", "a")),
    ],
    ids=["no-data", "no-grant", "other-users", "lone-surrogate", "too-large"],
)
def test_a_refused_publish_gets_an_error_and_publishes_nothing(
    frame: dict[str, Any], expected: dict[str, Any]
) -> None:
    node = Node(token_secret=SECRET, max_message_size=100)
    ws = publisher(node, sub="alice")
    ws.json(frame)
    assert errors_of(ws.take()) == [expected]
    for channel in ("a", "b", "dm#bob"):
        assert node.broker.history(channel, "0-0", None).result.messages == []


def test_publish_is_rate_limited_per_connection_on_the_clock(grant: Node) -> None:
    ws = publisher(grant)
    for n in range(3):
        ws.json({"type": "publish", "channel": "a", "data": n})
    assert errors_of(ws.take()) == [error("rate_limited", "a")]
    grant.advance(0.99)
    ws.json({"type": "publish", "channel": "a", "data": 3})
    assert errors_of(ws.take()) == [error("rate_limited", "a")]
    grant.advance(0.02)
    ws.json({"type": "publish", "channel": "a", "data": 4})
    assert ws.take() == []
    stored = grant.broker.history("a", "0-0", None).result.messages
    assert [data for _, data in stored] == [b"0", b"1", b"4"]
    # Another connection has a bucket of its own.
    other = publisher(grant)
    other.json({"type": "publish", "channel": "a", "data": 5})
    assert other.take() == []


def test_a_clients_publishes_keep_their_order_whatever_the_broker_does(grant: Node) -> None:
    held: list[tuple[Deferred[Any], bytes]] = []
    real = grant.broker.publish

    def publish(channel: str, data: bytes, key: str | None = None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        held.append((d, data))
        d.addCallback(lambda _: real(channel, data, key))
        return d

    grant.broker.publish = publish
    ws = publisher(grant)
    ws.json({"type": "publish", "channel": "a", "data": 1})
    ws.json({"type": "publish", "channel": "a", "data": 2})
    assert [data for _, data in held] == [b"1"]  # the second waits for the first
    held[0][0].callback(None)
    assert [data for _, data in held] == [b"1", b"2"]
    held[1][0].callback(None)
    stored = grant.broker.history("a", "0-0", None).result.messages
    assert [data for _, data in stored] == [b"1", b"2"]


@pytest.mark.parametrize(
    ("failure", "code"),
    [(BrokerUnavailable, "unavailable"), (OutcomeUnknown, "outcome_unknown")],
)
def test_a_broker_refusal_is_an_error_frame(
    grant: Node, failure: type[Exception], code: str
) -> None:
    grant.broker.publish = lambda *a, **k: fail(failure())
    ws = publisher(grant)
    ws.json({"type": "publish", "channel": "a", "data": 1})
    assert errors_of(ws.take()) == [error(code, "a")]
    assert ws.close_code() is None


# -- the server's own closes


def test_an_expiring_token_closes_with_4001_on_the_clock() -> None:
    node = Node(token_secret=SECRET)
    exp = int(time.time()) + 600
    ws = node.websocket(f"/ws?channel=a&token={token(node, exp=exp)}")
    assert ws.take() == [subscribed("a")]
    node.advance(exp - node.reactor.seconds() - 1)
    assert ws.close_code() is None
    node.advance(2)
    assert ws.close_code() == 4001
    assert node.hub.count("a") == 0


def test_the_applications_disconnect_closes_with_4003_and_destroy_unsubscribes() -> None:
    node = Node(token_secret=SECRET)
    ws = node.websocket(f"/ws?channel=a&token={token(node, sub='alice')}")
    assert ws.take() == [subscribed("a"), subscribed("user#alice")]
    assert node.hub.control({"cmd": "destroy", "channel": "a"}) == 1
    assert ws.take() == [{"type": "unsubscribed", "channel": "a"}]
    assert node.hub.control({"cmd": "disconnect", "user": "alice"}) == 1
    assert ws.close_code() == 4003 and node.hub.channels() == {}


def test_stopping_closes_every_client_with_1001_and_waits_for_them(node: Node) -> None:
    clients = [node.websocket("/ws?channel=a") for _ in range(2)]
    gone = node.ws_factory.close_all()
    assert [ws.close_code() for ws in clients] == [1001, 1001]
    assert node.hub.count("a") == 0 and not gone.called
    for ws in clients:
        ws.close()
    assert gone.called


def test_a_closed_connection_leaves_nothing_behind(node: Node) -> None:
    ws = node.websocket("/ws?channel=a&channel=b")
    ws.close()
    assert node.hub.channels() == {}
    assert not node.ws_factory.clients
    assert node.reactor.getDelayedCalls() == []


# -- the slow consumer


def test_a_client_that_stops_reading_is_dropped_with_4008_past_the_bound() -> None:
    node = Node(max_send_buffer=1000)
    ws = node.websocket("/ws?channel=a")
    ws.take()
    # Twisted's buffer is full: the transport pauses its producer, the protocol.
    assert ws.transport.producer is ws.ws
    ws.ws.pauseProducing()
    payload = b'"' + b"x" * 200 + b'"'
    for _ in range(3):
        node.publish("a", payload)
    assert ws.close_code() is None  # about 800 bytes queued: within the bound
    node.publish("a", payload)
    assert ws.close_code() == 4008
    assert node.hub.count("a") == 0
    assert node.service.metrics.slow_consumers.labels("websocket")._value.get() == 1


def test_a_client_that_reads_again_in_time_is_kept() -> None:
    node = Node(max_send_buffer=1000)
    ws = node.websocket("/ws?channel=a")
    payload = b'"' + b"x" * 200 + b'"'
    for _ in range(3):
        ws.ws.pauseProducing()
        for _ in range(3):
            node.publish("a", payload)
        ws.ws.resumeProducing()  # the buffer drained: the count starts again
    assert ws.close_code() is None
    assert len([e for e in ws.events() if e["type"] == "message"]) == 9


def test_a_replay_is_not_counted_against_the_bound() -> None:
    node = Node(max_send_buffer=500)
    ids = [node.publish("a", b'"' + b"x" * 200 + b'"') for _ in range(5)]
    ws = node.websocket()
    ws.ws.pauseProducing()
    ws.json({"type": "subscribe", "channel": "a", "since": "0-0"})
    assert ws.close_code() is None
    assert [e.get("id") for e in ws.events()] == [None, *ids]


# -- pings on the clock


def test_a_peer_that_answers_pings_is_kept_one_that_does_not_is_dropped() -> None:
    node = Node(ping_interval=5, ping_timeout=3)
    ws = node.websocket("/ws")
    node.advance(5.3)
    pings = [f for f in ws.frames() if f.opcode == 0x9]
    assert len(pings) == 1
    ws.send(client_frame(pings[0].payload, opcode=0xA))  # pong
    node.advance(3.5)
    assert not ws.transport.disconnecting and ws.close_code() is None
    node.advance(2)  # the next ping, left unanswered
    assert len([f for f in ws.frames() if f.opcode == 0x9]) == 2
    node.advance(2)  # less than the timeout since the ping (Autobahn's timers: 0.2 s buckets)
    assert not ws.transport.aborted
    node.advance(1.5)
    # Dropped, without a close handshake: closed at once, aborted DROP_LINGER
    # later (this transport is not TCP: what it holds may still be unsent).
    assert ws.transport.disconnecting and not ws.transport.aborted
    node.advance(DROP_LINGER)
    assert ws.transport.aborted
    ws.close()
    assert not node.ws_factory.clients

"""The Redis bus is untrusted input (the contract: "Any process may also publish
straight into Redis"). Whatever bytes another process PUBLISHes on
`<prefix><channel>` reach that channel's subscribers once, as data with no id,
and change nothing else; pushd's own payloads carry a marker no foreign payload
has by accident. Real redis-server, real pushd processes, real clients."""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.client import ResponseFailed

from tests.sse import EventStream, open_sse
from tests.support import (
    Node,
    PushdUnderTest,
    RedisServer,
    connect_raw,
    with_timeout,
)

RECIPE = Path(__file__).parent.parent / "pushd" / "broker" / "redis" / "publish_with_history.lua"
MARKER = b"\x00pushd/1\n"


def strict(text: str) -> Any:
    """What the contract calls strict JSON, with the stdlib: ValueError otherwise."""

    def finite(number: str) -> float:
        value = float(number)
        if not math.isfinite(value):
            raise ValueError(number)
        return value

    def constant(name: str) -> Any:
        raise ValueError(name)

    return json.loads(text, parse_float=finite, parse_constant=constant)


def expected_data(payload: bytes) -> Any:
    """The `data` the contract promises for a foreign payload."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return payload.decode("utf-8", "replace")
    try:
        return strict(text)
    except (ValueError, RecursionError):
        return text


async def run(*argv: str) -> tuple[str, int]:
    out, err, code = await getProcessOutputAndValue(argv[0], argv[1:], reactor=reactor)
    return (out + err).decode("utf-8", "replace"), code


# -- the three transports, read alike: every server event as parsed JSON


class Reader:
    async def next(self) -> dict[str, Any]:
        raise NotImplementedError

    async def subscribed(self) -> None:
        """Wait until the subscription is live."""
        while (await self.next())["type"] != "subscribed":
            pass

    async def messages(self, until: Any) -> list[dict[str, Any]]:
        """Every message up to and with the one whose data is `until`."""
        got: list[dict[str, Any]] = []
        while not got or got[-1]["data"] != until:
            event = await self.next()
            if event["type"] == "message":
                got.append(event)
        return got

    async def close(self) -> None:
        raise NotImplementedError


class WSReader(Reader):
    def __init__(self, client: Any) -> None:
        self.client = client

    async def next(self) -> dict[str, Any]:
        return await self.client.next()

    async def close(self) -> None:
        await self.client.close()


class SSEReader(Reader):
    def __init__(self, stream: EventStream) -> None:
        self.stream = stream

    async def next(self) -> dict[str, Any]:
        event = await self.stream.next()
        data = json.loads(event.data)
        if event.type == "message":
            # Framing: one event per message, its `id:` only with a message id.
            assert data["type"] == "message", event
            assert (data["id"] is None) or event.last_event_id == data["id"], event
        return data

    async def close(self) -> None:
        self.stream.close()


class NDJSONReader(Reader):
    def __init__(self) -> None:
        self.lines: DeferredQueue[dict[str, Any]] = DeferredQueue()
        self.buffer = b""
        self.response: Any = None
        self.ended: Any = None

    def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if line:
                self.lines.put(json.loads(line))  # a broken line fails the test here

    async def next(self) -> dict[str, Any]:
        return await with_timeout(self.lines.get())

    async def close(self) -> None:
        self.ended.addErrback(lambda f: f.trap(ResponseFailed))
        self.response.original._transport.stopProducing()


async def open_readers(url: str, ws_port: int, channel: str) -> list[Reader]:
    from tests.support import connect_ws

    ws = WSReader(await connect_ws(ws_port, f"/ws?channel={channel}"))
    sse = SSEReader(await open_sse(f"{url}/sse?channel={channel}"))
    nd = NDJSONReader()
    nd.response = await treq.get(
        f"{url}/stream?channel={channel}", unbuffered=True, persistent=False
    )
    assert nd.response.code == 200
    nd.ended = treq.collect(nd.response, nd.feed)
    readers: list[Reader] = [ws, sse, nd]
    for reader in readers:
        await reader.subscribed()
    return readers


def sample(pushd: PushdUnderTest, name: str, **labels: str) -> float:
    assert pushd.service is not None
    return pushd.service.metrics.registry.get_sample_value(name, labels) or 0.0


# -- specific payloads, one pushd on Redis


OWN = b'{"type":"message","channel":"news","id":"9-0","data":1}'
OTHER = b'{"type":"message","channel":"other","id":"1-0","data":1}'
FOREIGN = [
    pytest.param(b"123", id="a number"),
    pytest.param(
        b'{"type":"message","channel":"news","id":"1900000000000-0","data":"forged"}',
        id="a far-future id",
    ),
    pytest.param(
        b'{"type":"message","channel":"other","id":"1-0","data":"elsewhere"}',
        id="another channel",
    ),
    pytest.param(b'{"type":"message","channel":"news","id":5,"data":1}', id="a number id"),
    pytest.param(MARKER + OTHER, id="marker+other channel"),
    pytest.param(MARKER + OWN + b"\r", id="marker+CR"),
    pytest.param(MARKER + OWN.replace(b"1}", b'"\xff"}'), id="marker+invalid UTF-8"),
    pytest.param(MARKER + OWN + b"\n", id="marker+empty line"),
    pytest.param(MARKER + OWN + b"\n" + OTHER, id="marker+a line of another channel"),
    pytest.param(MARKER, id="the marker alone"),
    pytest.param(OWN + b"\n" + OWN, id="two envelopes without the marker"),
    pytest.param(b'{"a":1}\n{"b":2}', id="two lines"),
    pytest.param(b"one\rtwo\r\n\r\ndata: three", id="CR"),
    pytest.param(b"\xff\xfe caf\xc3\xa9 \xed\xa0\x80", id="invalid UTF-8"),
    pytest.param(b"", id="empty"),
    pytest.param(b"  [1, 2.5, {\"x\": null}]  ", id="JSON with whitespace"),
    pytest.param(b'{"x": 1e400}', id="a number past a double"),
    pytest.param(b"NaN", id="NaN"),
    pytest.param(b'"\\ud800"', id="an escaped lone surrogate"),
    pytest.param(b"[" * 5000 + b"]" * 5000, id="nested too deep"),
]  # fmt: skip


@pytest.mark.parametrize("payload", FOREIGN)
@pytest_twisted.ensureDeferred
async def test_a_foreign_payload_is_data_once_and_moves_nothing(
    redis_pushd: PushdUnderTest, redis_client: Any, payload: bytes
) -> None:
    prefix = redis_pushd.cfg.redis_prefix
    readers = await open_readers(redis_pushd.url, redis_pushd.port, "news")
    bystander = await redis_pushd.connect("?channel=other")
    await bystander.next_of("subscribed")
    first = await redis_pushd.publish("news", "before")
    await redis_client.publish(prefix + "news", payload)
    last = await redis_pushd.publish("news", "after")
    for reader in readers:
        got = await reader.messages(until="after")
        assert [(m["channel"], m["id"]) for m in got] == [
            ("news", first), ("news", None), ("news", last)
        ]  # fmt: skip
        assert got[1] == {
            "type": "message", "channel": "news", "id": None, "data": expected_data(payload)
        }  # fmt: skip
        await reader.close()
    await bystander.nothing_more()
    await bystander.close()
    assert sample(redis_pushd, "pushd_bus_foreign_messages_total") == 1
    for stage in ("parse", "take", "receive", "control"):
        assert sample(redis_pushd, "pushd_bus_errors_total", stage=stage) == 0
    assert sample(redis_pushd, "pushd_delivery_errors_total") == 0


@pytest_twisted.ensureDeferred
async def test_redis_cli_publish_of_a_number(
    redis_pushd: PushdUnderTest, redis_server: RedisServer
) -> None:
    """`redis-cli PUBLISH pushd:abc 123`, the nginx+Redis gateways' way to push."""
    client = await redis_pushd.connect("?channel=abc")
    await client.next_of("subscribed")
    cli = ("redis-cli", "-p", str(redis_server.port))
    # What a number-converting reader would change: each is delivered as sent.
    sent = {
        "123": 123,
        "-1.50": -1.5,
        "1e400": "1e400",
        "+5": "+5",
        "00.5": "00.5",
        "1_000": "1_000",
    }
    for payload in sent:
        out, code = await run(*cli, "PUBLISH", redis_pushd.cfg.redis_prefix + "abc", payload)
        assert (code, out.strip()) == (0, "1")
    got = [await client.next_of("message") for _ in sent]
    assert [(m["id"], m["data"]) for m in got] == [(None, data) for data in sent.values()]
    # The subscriber connection lived on: pushd's own messages still arrive.
    msg_id = await redis_pushd.publish("abc", "still here")
    assert (await client.next_of("message"))["id"] == msg_id
    await client.close()


@pytest_twisted.ensureDeferred
async def test_a_forged_far_future_id_does_not_hold_back_later_messages(
    redis_pushd: PushdUnderTest, redis_client: Any
) -> None:
    prefix = redis_pushd.cfg.redis_prefix
    client = await redis_pushd.connect("?channel=news")
    await client.next_of("subscribed")
    before = await redis_pushd.publish("news", 0)
    forged = {"type": "message", "channel": "news", "id": "1900000000000-0", "data": "forged"}
    await redis_client.publish(prefix + "news", json.dumps(forged).encode())
    ids = [await redis_pushd.publish("news", n) for n in range(1, 4)]
    got = [await client.next_of("message") for _ in range(5)]
    assert [m["id"] for m in got] == [before, None, *ids]
    assert got[1]["data"] == forged
    # A client recovering from the first message gets exactly the genuine ones.
    late = await redis_pushd.connect(f"?channel=news&since={before}")
    assert (await late.next_of("subscribed"))["recovered"] is True
    assert [(await late.next_of("message"))["id"] for _ in ids] == ids
    await late.nothing_more()
    await client.nothing_more()
    await client.close()
    await late.close()


def resp(*args: bytes | str) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


@pytest_twisted.ensureDeferred
async def test_foreign_payloads_in_the_same_read_as_genuine_ones(
    redis_pushd: PushdUnderTest, redis_server: RedisServer
) -> None:
    """One MULTI/EXEC, written at once: its PUBLISHes reach pushd's subscriber
    connection together. Nothing of that read is lost, on any channel."""
    prefix = redis_pushd.cfg.redis_prefix
    client = await redis_pushd.connect("?channel=news&channel=sport")
    for _ in range(2):
        await client.next_of("subscribed")
    recipe = RECIPE.read_text()

    def genuine(channel: str, data: str) -> bytes:
        return resp("EVAL", recipe, "1", f"{prefix}{{{channel}}}:history", prefix, channel, data)

    commands = [
        resp("MULTI"),
        resp("PUBLISH", prefix + "news", b"123"),
        genuine("news", '"n1"'),
        resp("PUBLISH", prefix + "sport", b"\xff{not json"),
        genuine("sport", '"s1"'),
        resp("PUBLISH", prefix + "news", b'{"type":"message","channel":"news","id":"1-0"}'),
        resp("PUBLISH", prefix + "!control", b"[1, 2]"),
        genuine("news", '"n2"'),
        resp("PUBLISH", prefix + "news", b""),
        genuine("sport", '"s2"'),
        resp("EXEC"),
    ]
    raw = await connect_raw(redis_server.port)
    raw.transport.write(b"".join(commands))
    await raw.until(b"*9\r\n")  # EXEC's answer
    raw.transport.loseConnection()
    got = [await client.next_of("message") for _ in range(8)]
    news = [(m["id"] is None, m["data"]) for m in got if m["channel"] == "news"]
    sport = [(m["id"] is None, m["data"]) for m in got if m["channel"] == "sport"]
    assert news == [
        (True, 123),
        (False, "n1"),
        (True, {"type": "message", "channel": "news", "id": "1-0"}),
        (False, "n2"),
        (True, ""),
    ]
    assert sport == [(True, "\ufffd{not json"), (False, "s1"), (False, "s2")]
    await client.nothing_more()
    await client.close()
    assert sample(redis_pushd, "pushd_bus_foreign_messages_total") == 4


@pytest_twisted.ensureDeferred
async def test_nothing_raised_on_the_way_in_reaches_txredisapi(
    redis_pushd: PushdUnderTest, redis_client: Any
) -> None:
    """Whatever raises past the subscriber connection is logged and counted;
    the connection, and the other messages of the same read, live on."""
    assert redis_pushd.service is not None
    client = await redis_pushd.connect("?channel=news")
    await client.next_of("subscribed")
    hub = redis_pushd.service.hub
    hub_receive = hub.receive

    def receive(channel: str, payload: bytes) -> None:
        if payload == b"raise":
            raise RuntimeError("a listener's bug")
        hub_receive(channel, payload)

    hub.receive = receive  # type: ignore[method-assign]  # what the broker calls
    t = await redis_client.multi()
    for payload in (b"1", b"raise", b"2"):
        await t.publish(redis_pushd.cfg.redis_prefix + "news", payload)
    await t.commit()
    assert [(await client.next_of("message"))["data"] for _ in range(2)] == [1, 2]
    assert sample(redis_pushd, "pushd_bus_errors_total", stage="receive") == 1
    msg_id = await redis_pushd.publish("news", "after")
    assert (await client.next_of("message"))["id"] == msg_id
    await client.close()


CONTROL_JUNK = [
    b"123",
    b"",
    b"\xff",
    b"[1]",
    b'"text"',
    b'{"cmd": "subscribe", "user": "u", "channel": ["x"]}',
    b'{"cmd": "subscribe", "user": "u", "channel": "not a channel"}',
    b'{"cmd": "disconnect", "user": {"a": 1}}',
    b'{"cmd": "destroy", "channel": 5}',
    b'{"id": [1], "reply": "nowhere"}',
    b"[" * 100000,
]


@pytest_twisted.ensureDeferred
async def test_foreign_payloads_on_the_control_channels_change_nothing(
    redis_pushd: PushdUnderTest, redis_client: Any
) -> None:
    prefix = redis_pushd.cfg.redis_prefix
    assert redis_pushd.service is not None
    node = redis_pushd.service.broker.node  # type: ignore[attr-defined]
    client = await redis_pushd.connect("?channel=news")
    await client.next_of("subscribed")
    for payload in CONTROL_JUNK:
        await redis_client.publish(prefix + "!control", payload)
        await redis_client.publish(f"{prefix}!reply:{node}", payload)
    msg_id = await redis_pushd.publish("news", "after")
    frame = await client.next_of("message")
    assert frame["id"] == msg_id
    for stage in ("receive", "control"):
        assert sample(redis_pushd, "pushd_bus_errors_total", stage=stage) == 0
    # The application's commands still work.
    response = await treq.delete(f"{redis_pushd.url}/channels/news", persistent=False)
    assert response.code == 200 and (await response.json())["nodes"] == 1
    assert (await client.next_of("unsubscribed"))["channel"] == "news"
    await client.close()


# -- the recipe for backends: publish with history, checked


@pytest_twisted.ensureDeferred
async def test_the_recipe_publishes_with_history_from_redis_cli(
    redis_pushd: PushdUnderTest, redis_server: RedisServer
) -> None:
    prefix = redis_pushd.cfg.redis_prefix
    readers = await open_readers(redis_pushd.url, redis_pushd.port, "news")
    before = await redis_pushd.publish("news", "from pushd")

    async def recipe(data: str, *more: str) -> tuple[str, int]:
        return await run(
            "redis-cli", "-p", str(redis_server.port), "--eval", str(RECIPE),
            f"{prefix}{{news}}:history", ",", prefix, "news", data, *more,
        )  # fmt: skip

    out, code = await recipe('{"from": "redis-cli",\n "n": [1, 2.5e3]}')
    assert code == 0, out
    json_id = out.strip().strip('"')
    out, code = await recipe('text\twith "quotes", a \\ and é\n', "text")
    assert code == 0, out
    text_id = out.strip().strip('"')
    for reader in readers:
        got = await reader.messages(until='text\twith "quotes", a \\ and é\n')
        assert [(m["id"], m["data"]) for m in got] == [
            (before, "from pushd"),
            (json_id, {"from": "redis-cli", "n": [1, 2500.0]}),
            (text_id, 'text\twith "quotes", a \\ and é\n'),
        ]
        await reader.close()
    # History like any other message, linked: a client recovering from `before` gets both.
    late = await redis_pushd.connect(f"?channel=news&since={before}")
    assert (await late.next_of("subscribed"))["recovered"] is True
    assert [(await late.next_of("message"))["id"] for _ in range(2)] == [json_id, text_id]
    await late.close()
    response = await treq.get(f"{redis_pushd.url}/channels/news/history", persistent=False)
    messages = (await response.json())["messages"]
    assert [m["id"] for m in messages] == [before, json_id, text_id]
    assert messages[1]["data"] == {"from": "redis-cli", "n": [1, 2500.0]}


@pytest.mark.parametrize(
    ("data", "more", "why"),
    [
        ('{"x": 1e400}', (), "a number that does not fit a double"),
        ("1.8e308", (), "a number that does not fit a double"),
        (str(2**1024), (), "a number that does not fit a double"),  # 309 digits
        # DBL_MAX + 1: a double reads it as DBL_MAX, pushd refuses it (exact integers)
        (f"[-{int(sys.float_info.max) + 1}]", (), "a number that does not fit a double"),
        ('"\\ud800"', (), "a lone surrogate escape"),
        ('"\\udc00"', (), "a lone surrogate escape"),
        ('"\\ud800\\u0041"', (), "a lone surrogate escape"),
        ("NaN", (), "not JSON"),
        ("Infinity", (), "not JSON"),
        ("0x10", (), "more than one JSON value"),
        ("01", (), "more than one JSON value"),
        ("+1", (), "not JSON"),
        ("1.", (), "a bad number"),
        ("[1,]", (), "not JSON"),
        ("", (), "not JSON"),
        ("{'a': 1}", (), "a key that is not a string"),
        ('"a\tb"', (), "a control character in a string"),
        ('"\\x"', (), "a bad escape"),
        ('"\udced\udca0\udc80"', (), "not UTF-8"),  # a surrogate's bytes (CESU-8)
        ("[" * 600 + "]" * 600, (), "nested too deeply"),
        ('"' + "x" * 100 + '"', ("json", "100", "3600", "100"), "over 100"),
        ("\udcff", ("text",), "not UTF-8"),
        ("1", ("yaml",), "json or text"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_the_recipe_refuses_what_pushd_would_not_store(
    redis_pushd: PushdUnderTest,
    redis_server: RedisServer,
    data: str,
    more: tuple[str, ...],
    why: str,
) -> None:
    prefix = redis_pushd.cfg.redis_prefix
    client = await redis_pushd.connect("?channel=news")
    await client.next_of("subscribed")
    argv = [
        "redis-cli", "-p", str(redis_server.port), "--eval", str(RECIPE),
        f"{prefix}{{news}}:history", ",", prefix, "news",
    ]  # fmt: skip
    raw = data.encode("utf-8", "surrogateescape")
    out, err, _ = await getProcessOutputAndValue(
        argv[0],
        [*argv[1:], raw, *more],
        reactor=reactor,  # type: ignore[list-item]
    )
    answer = (out + err).decode("utf-8", "replace")
    assert "ERR pushd: " in answer and why in answer, answer
    response = await treq.get(f"{redis_pushd.url}/channels/news/history", persistent=False)
    assert (await response.json())["messages"] == []
    await client.nothing_more()
    await client.close()


@pytest_twisted.ensureDeferred
async def test_the_recipe_checks_its_keys_and_channel(
    redis_server: RedisServer, prefix: str
) -> None:
    cli = ("redis-cli", "-p", str(redis_server.port), "--eval", str(RECIPE))
    out, _ = await run(*cli, f"{prefix}{{news}}:history", ",", prefix, "sport", "1")
    assert "ERR pushd: KEYS[1] must be" in out
    out, _ = await run(*cli, f"{prefix}{{a b}}:history", ",", prefix, "a b", "1")
    assert "ERR pushd: not a channel name" in out
    out, _ = await run(*cli, f"{prefix}{{dm#a,b}}:history", ",", prefix, "dm#a,b", "1")
    assert out.strip().strip('"').endswith("-0"), out


# -- the property: arbitrary bytes between pushd's own messages, two nodes, three transports


def envelope_like(draw_id: str, channel: str, data: str) -> bytes:
    return json.dumps(
        {"type": "message", "channel": channel, "id": draw_id, "data": data},
        separators=(",", ":"),
    ).encode()


ids = st.one_of(
    st.just("1900000000000-0"),
    st.from_regex(r"\A[0-9]{1,20}-[0-9]{1,20}\Z"),
    st.text(max_size=8),
)
forged = st.builds(envelope_like, ids, st.sampled_from(["prop", "other", "x"]), st.text(max_size=8))
payloads = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=20).map(str.encode),
    st.integers().map(lambda n: str(n).encode()),
    st.floats(allow_nan=False).map(lambda n: json.dumps(n).encode()),
    forged,
    st.tuples(st.booleans(), st.lists(forged, min_size=1, max_size=3)).map(
        lambda t: (MARKER if t[0] else b"") + b"\n".join(t[1])
    ),
    st.sampled_from([b"", b"\r", b"\n", b"\r\n\r\n", b"data: x\n\n", MARKER, b"NaN"]),
)


@pytest_twisted.async_yield_fixture
async def two_nodes(
    redis_server: RedisServer, tmp_path: Path, prefix: str
) -> AsyncIterator[list[Node]]:
    options = ("--redis", f"redis://127.0.0.1:{redis_server.port}", "--redis-prefix", prefix)
    nodes = [Node(tmp_path, *options) for _ in range(2)]
    for node in nodes:
        node.start()
    try:
        await defer.gatherResults([defer.Deferred.fromCoroutine(n.ready()) for n in nodes])
        yield nodes
    finally:
        for node in nodes:
            node.stop()


_examples = itertools.count()


@pytest.fixture
def publish_raw(redis_client: Any, prefix: str) -> Callable[[str, bytes], Deferred[Any]]:
    """PUBLISH bytes on a channel's bus, as any process may (a plain function:
    hypothesis prints the test's arguments when it fails, and txredisapi's
    connection answers every attribute, `_repr_pretty_` included, wrongly)."""

    def publish(channel: str, payload: bytes) -> Deferred[Any]:
        return redis_client.publish(prefix + channel, payload)

    return publish


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(st.lists(payloads, max_size=3), min_size=1, max_size=4))
@pytest_twisted.ensureDeferred
async def test_arbitrary_bytes_between_messages_change_nothing(
    two_nodes: list[Node], publish_raw: Any, steps: list[list[bytes]]
) -> None:
    """Between pushd's own messages, published on either node, any bytes are
    PUBLISHed straight into Redis: on both nodes, over WebSocket, SSE and
    NDJSON, every message of pushd's arrives exactly once, in order, and each
    foreign payload once, as data with no id, where it was sent."""
    channel = f"prop{next(_examples)}"
    readers = [r for node in two_nodes for r in await open_readers(node.url, node.port, channel)]
    expected: list[tuple[str | None, Any]] = []
    for n, foreign in enumerate(steps):
        node = two_nodes[n % 2]
        expected.append((await node.publish(channel, {"n": n}), {"n": n}))
        for payload in foreign:
            await publish_raw(channel, payload)
            expected.append((None, expected_data(payload)))
    end = await two_nodes[1].publish(channel, "end")
    expected.append((end, "end"))
    for reader in readers:
        got = await reader.messages(until="end")
        assert [(m["id"], m["data"]) for m in got] == expected
        assert {m["channel"] for m in got} == {channel}
        await reader.close()


@pytest_twisted.ensureDeferred
async def test_every_publish_path_speaks_the_bus_format(
    start_pushd: Any, redis_client: Any
) -> None:
    """Both brokers hand the hub pushd's format, from every way in: a publish,
    a batch (on Redis one payload for a run of a channel's messages), /push."""
    pushd = await start_pushd()
    assert pushd.service is not None
    seen: list[bytes] = []
    hub_receive = pushd.service.hub.receive

    def spy(channel: str, payload: bytes) -> None:
        seen.append(payload)
        hub_receive(channel, payload)

    pushd.service.hub.receive = spy  # type: ignore[method-assign]  # what the broker calls
    client = await pushd.connect("?channel=news")
    await client.next_of("subscribed")
    msg_id = await pushd.publish("news", {"a": 1})
    assert (await client.next_of("message"))["id"] == msg_id
    assert seen == [
        MARKER + b'{"type":"message","channel":"news","id":"%s","data":{"a":1}}' % msg_id.encode()
    ]
    batch = b"".join(b'{"channel":"news","data":%d}\n' % n for n in range(3))
    response = await treq.post(
        f"{pushd.url}/publish",
        batch,
        headers={"content-type": ["application/x-ndjson"]},
        persistent=False,
    )
    ids = [r["id"] for r in (await response.json())["results"]]
    response = await treq.post(f"{pushd.url}/push?c=news", b"pushed", persistent=False)
    assert response.code == 200
    # The gateway's lists are not prefixed: leave them as other tests expect them.
    await redis_client.execute_command("DEL", "news")
    await redis_client.execute_command("LREM", "message_gateway_event", 0, "news")
    got = [await client.next_of("message") for _ in range(4)]
    assert [m["id"] for m in got[:3]] == ids and got[3]["id"] is not None
    assert [m["data"] for m in got] == [0, 1, 2, "pushed"]
    assert all(payload.startswith(MARKER) for payload in seen)
    assert sample(pushd, "pushd_bus_foreign_messages_total") == 0
    await client.close()


# -- the recipe's copy of pushd's publish

PUBLISH_LUA = RECIPE.parent / "publish.lua"
_COPY_START = "-- BEGIN pushd/broker/redis/publish.lua\nlocal function publish(KEYS, ARGV)\n"
_COPY_END = "-- END pushd/broker/redis/publish.lua\nend\n"


def recipe_copy(recipe: str) -> tuple[str, str, str]:
    """The recipe around its copy of publish.lua: (before, the copy, after)."""
    start = recipe.index(_COPY_START) + len(_COPY_START)
    end = recipe.index(_COPY_END, start)
    return recipe[:start], recipe[start:end], recipe[end:]


def test_the_recipe_stores_as_pushd_does() -> None:
    """It holds a verbatim copy of publish.lua: whatever pushd's publish keeps
    (links, the channel's newest id, idempotency), the recipe keeps alike."""
    _, copy, _ = recipe_copy(RECIPE.read_text())
    assert copy == PUBLISH_LUA.read_text(), (
        "publish_with_history.lua holds an old copy of publish.lua: "
        "run `python -m tests.test_bus` to copy it again"
    )


if __name__ == "__main__":
    before, _, after = recipe_copy(RECIPE.read_text())
    RECIPE.write_text(before + PUBLISH_LUA.read_text() + after)
    print(f"{RECIPE}: publish.lua copied in")

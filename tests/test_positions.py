"""`subscribed`'s position end to end, on the memory broker and on Redis: over
WebSocket and NDJSON it is the channel's newest id (null without history), over
SSE the `event: subscribed` cursor; resuming from it, a quiet channel loses
nothing published while the client was away."""

from __future__ import annotations

import base64
import json
import random
import re

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.testing import StringTransport

from pushd.message import Message, envelope, parse_id
from pushd.transports.sse import SseStream
from pushd.transports.stream import decode_cursor, encode_cursor
from pushd.web.errors import ApiError
from tests.sse import open_sse
from tests.support import PushdUnderTest, StartPushd, WSClient, connect_raw
from tests.test_streams import until_live


@pytest_twisted.ensureDeferred
async def test_websocket_position_is_the_newest_id_and_resumes_a_quiet_channel(
    pushd: PushdUnderTest,
) -> None:
    ids = [await pushd.publish("busy", n) for n in range(3)]
    client = await pushd.connect("?channel=busy&channel=quiet")
    acks = {f["channel"]: f for f in [await client.next_of("subscribed") for _ in range(2)]}
    assert acks["busy"] == {
        "type": "subscribed", "channel": "busy", "recovered": False, "position": ids[-1]
    }  # fmt: skip
    assert acks["quiet"]["position"] is None
    await client.nothing_more()  # no history sent without since
    await client.close()

    # Away: one message on each channel. Back, each from its position.
    missed = {c: await pushd.publish(c, c) for c in ("busy", "quiet")}
    client = await pushd.connect()
    client.send({"type": "subscribe", "channel": "busy", "since": ids[-1]})
    client.send({"type": "subscribe", "channel": "quiet", "since": "0-0"})
    frames = [await client.next() for _ in range(4)]
    got = {f["channel"]: f["id"] for f in frames if f["type"] == "message"}
    assert got == missed
    acks = {f["channel"]: f for f in frames if f["type"] == "subscribed"}
    assert acks["busy"]["recovered"] is True
    assert acks["busy"]["position"] == missed["busy"]
    assert acks["quiet"]["position"] == missed["quiet"]
    # "From the beginning" of a channel that never lost a message is complete.
    assert acks["quiet"]["recovered"] is True
    await client.nothing_more()
    await client.close()


@pytest_twisted.ensureDeferred
async def test_since_ahead_of_the_channel_goes_live(pushd: PushdUnderTest) -> None:
    newest = await pushd.publish("skew", 0)
    ms, _ = parse_id(newest)
    ahead = f"{ms + 3_600_000}-0"  # a client whose clock runs an hour ahead
    client = await pushd.connect(f"?channel=skew&since={ahead}")
    assert await client.next() == {
        "type": "subscribed", "channel": "skew", "recovered": False, "position": newest
    }  # fmt: skip
    live = [await pushd.publish("skew", n) for n in (1, 2)]
    assert [(await client.next_of("message"))["id"] for _ in live] == live
    await client.nothing_more()
    await client.close()


@pytest_twisted.ensureDeferred
async def test_since_the_beginning_replays_every_retained_message(pushd: PushdUnderTest) -> None:
    ids = [await pushd.publish("all", n) for n in range(5)]
    client = await pushd.connect("?channel=all&since=0-0")
    ack = await client.next_of("subscribed")
    assert (ack["recovered"], ack["position"]) == (True, ids[-1])
    assert [(await client.next_of("message"))["id"] for _ in ids] == ids
    live = await pushd.publish("all", 5)
    assert (await client.next_of("message"))["id"] == live
    await client.nothing_more()
    await client.close()


@pytest_twisted.ensureDeferred
async def test_sse_cursor_resumes_a_quiet_channel(pushd: PushdUnderTest) -> None:
    """A browser cut off before any message came reconnects with the cursor of
    the `event: subscribed`: the message published meanwhile on the quiet
    channel comes once; the other channel replays nothing."""
    old = await pushd.publish("busy", "old")
    url = f"{pushd.url}/sse?channel=busy&channel=quiet"
    first = await open_sse(url)
    events = await until_live(first)
    assert json.loads(events[-1].data)["channels"] == {"busy": old, "quiet": "0-0"}
    cursor = first.last_event_id
    assert cursor == events[-1].last_event_id and cursor
    first.close()

    missed = await pushd.publish("quiet", "while away")
    again = await open_sse(url, {"Last-Event-ID": cursor})
    events = [json.loads(e.data) for e in await until_live(again)]
    assert [e["id"] for e in events if e["type"] == "message"] == [missed]
    assert events[-1]["channels"] == {"busy": old, "quiet": missed}
    live = await pushd.publish("busy", "new")
    assert json.loads((await again.next()).data)["id"] == live
    again.close()

    # One channel: the cursor is the id itself, 0-0 while the channel is quiet.
    one = await open_sse(f"{pushd.url}/sse?channel=calm")
    assert (await until_live(one))[-1].last_event_id == "0-0"
    one.close()
    missed = await pushd.publish("calm", 1)
    one = await open_sse(f"{pushd.url}/sse?channel=calm", {"Last-Event-ID": "0-0"})
    events = await until_live(one)
    assert [e.last_event_id for e in events if e.type == "message"] == [missed]
    assert events[-1].last_event_id == missed
    one.close()


@pytest_twisted.ensureDeferred
async def test_ndjson_subscribed_line_carries_the_position(pushd: PushdUnderTest) -> None:
    newest = await pushd.publish("nd", 1)
    raw = await connect_raw(pushd.port)
    raw.transport.write(b"GET /stream?channel=nd&channel=none HTTP/1.1\r\nHost: x\r\n\r\n")
    data = await raw.until(b'"subscribed"', count=2)
    lines = [json.loads(line) for line in data.split(b"\r\n") if line.startswith(b"{")]
    acks = {line["channel"]: line for line in lines if line.get("type") == "subscribed"}
    assert acks["nd"]["position"] == newest
    assert acks["none"]["position"] is None
    raw.transport.loseConnection()


# -- the SSE framing of positions, without a network


def sse_events(transport: StringTransport) -> list[dict[str, str]]:
    """The events written, as {field: value} (an `id:` only where one was sent)."""
    text = transport.value().decode()
    events = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if fields:
            events.append(fields)
    return events


def sse_stream(channels: list[str]) -> tuple[SseStream, StringTransport]:
    """A stream writing unchunked (HTTP/1.0's framing) to a StringTransport."""
    transport = StringTransport()
    transport.connected = True  # type: ignore[attr-defined]
    stream = SseStream(False, 1 << 20, channels, lambda: None)
    stream._transport = transport
    return stream, transport


def test_sse_one_channel_id_lines() -> None:
    stream, request = sse_stream(["a"])
    stream.subscribed("a", False, None)
    stream.live()
    stream.message(Message("a", "5-0", envelope("a", "5-0", b"1")))
    # Beside one channel, the user's personal one: its ids are not the channel's.
    stream.message(Message("user#x", "9-0", envelope("user#x", "9-0", b"2")))
    stream.message(Message("a", None, envelope("a", None, b"3")))
    events = sse_events(request)
    assert [(e.get("event"), e.get("id")) for e in events] == [
        ("subscribed", None),  # before any replay: no id yet
        ("subscribed", "0-0"),  # live: a quiet channel resumes from its beginning
        (None, "5-0"),
        (None, None),
        (None, None),
    ]
    assert json.loads(events[0]["data"])["position"] is None
    assert json.loads(events[1]["data"]) == {"type": "subscribed", "channels": {"a": "0-0"}}


def test_sse_cursor_of_several_channels() -> None:
    stream, request = sse_stream(["a", "b", "c"])
    stream._last.update({"a": "3-0", "c": "9999999999999-0"})  # the request's cursor
    stream.subscribed("a", True, "4-0")
    stream.message(Message("a", "4-0", envelope("a", "4-0", b"1")))  # its replay
    stream.subscribed("b", False, None)
    stream.subscribed("c", False, "7-0")  # since ahead of c: its real newest id
    stream.live()
    events = sse_events(request)
    # Channels not joined yet keep what the request asked for.
    assert decode_cursor(events[1]["id"], ["a", "b", "c"]) == {"a": "4-0", "c": "9999999999999-0"}
    assert events[-1]["event"] == "subscribed"
    resume = {"a": "4-0", "b": "0-0", "c": "7-0"}
    assert decode_cursor(events[-1]["id"], ["a", "b", "c"]) == resume
    assert json.loads(events[-1]["data"]) == {"type": "subscribed", "channels": resume}
    stream.message(Message("b", "8-0", envelope("b", "8-0", b"2")))
    assert decode_cursor(sse_events(request)[-1]["id"], ["a", "b", "c"]) == {**resume, "b": "8-0"}


def test_sse_cursor_is_the_ids_alone_in_the_urls_order() -> None:
    """EventSource resends the cursor to the same URL: only the ids travel (a
    seq of 0 left out, a channel without a resume point empty), after a check
    of the channel list, so 100 channels of long names stay far under the
    header limit; a cursor of another channel list resumes none of them."""
    channels = ["a", "b", "c"]
    cursor = encode_cursor({"a": "1732900000000-0", "c": "5-3"}, channels)
    version, _, *ids = cursor.split(".")
    assert (version, ids) == ("1", ["1732900000000", "", "5-3"])
    assert re.fullmatch(r"[A-Za-z0-9_.~-]+", cursor)  # URL-safe
    assert decode_cursor(cursor, channels) == {"a": "1732900000000-0", "c": "5-3"}
    for other in (["a", "c", "b"], ["a", "b"], ["a", "b", "c", "d"], ["a", "b", "x"]):
        assert decode_cursor(cursor, other) == {}  # never one channel from another's id
    long = [f"c{i:03d}" + "x" * 96 for i in range(100)]
    big = encode_cursor(dict.fromkeys(long, "1732900000000-17"), long)
    assert len(big) < 2000 and decode_cursor(big, long) == dict.fromkeys(long, "1732900000000-17")


def test_sse_cursor_garbage_is_bad_since_and_the_former_cursor_still_resumes() -> None:
    channels = ["a", "b"]
    check = encode_cursor({}, channels).split(".")[1]
    for garbage in (
        "1.",
        "1.x",
        f"1.{check}.x.5",
        f"1.{check}.5-.5",
        f"2.{check}.5.5",
        "@@",
        "WzFd",  # JSON, not an object
    ):
        with pytest.raises(ApiError) as refused:
            decode_cursor(garbage, channels)
        assert refused.value.code == "bad_since"
    # What browsers and older pushd.js (its `?since=`) hold: base64url of {channel: id}.
    former = base64.urlsafe_b64encode(b'{"a":"4-0","x":"5-0"}').rstrip(b"=").decode()
    assert decode_cursor(former, channels) == {"a": "4-0"}


def test_sse_cursor_made_by_pushd_js_for_its_url() -> None:
    """pushd.js builds `1._.<ids>` with the URL it opens (no hash in a page
    outside a secure context): the ids in the URL's order, unchecked; the count
    must still match."""
    assert decode_cursor("1._.4.", ["a", "b"]) == {"a": "4-0"}
    assert decode_cursor("1._.4-2.7", ["a", "b"]) == {"a": "4-2", "b": "7-0"}
    assert decode_cursor("1._.4.7", ["a"]) == {}


@pytest_twisted.ensureDeferred
async def test_clients_joining_during_a_publish_storm_get_everything_after_their_position(
    start_pushd: StartPushd,
) -> None:
    """1,000 messages from 4 producers; 20 clients join without `since` at random
    moments (on Redis the read and pub/sub race); each gets exactly every
    message after its position, once, in order: no gap, nothing at or before it."""
    total, joiners = 1000, 20
    pushd = await start_pushd(history_size=total)
    rng = random.Random(13)
    ids: list[str] = []
    clients: list[WSClient] = []
    join_at = sorted(rng.sample(range(20, total - 20), joiners))

    async def producer(share: list[int]) -> None:
        for n in share:
            ids.append(await pushd.publish("storm", n))
            if join_at and len(ids) >= join_at[0]:
                join_at.pop(0)
                clients.append(await pushd.connect("?channel=storm"))

    numbers = list(range(total))
    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(producer(numbers[k::4])) for k in range(4)]
    )
    final = sorted(ids, key=parse_id)
    assert len(clients) == joiners
    for client in clients:
        ack = await client.next_of("subscribed")
        assert ack["position"] in final, ack
        expected = [i for i in final if parse_id(i) > parse_id(ack["position"])]
        got = [frame["id"] for frame in await client.next_many(len(expected), "message")]
        assert got == expected
        await client.nothing_more()
        await client.close()

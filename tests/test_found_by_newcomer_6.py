"""Shared subscription reads (pushd.reads), the command pool's patient
timeouts, whole-Burst stream writes and Autobahn's options on the protocol
class, tried from outside by a newcomer: a real redis-server, pushd in the
test's reactor, real WebSocket / SSE / NDJSON clients.

(tests/test_found_by_newcomer_5.py already existed, from an earlier round:
these are the sixth round's.)

DEFECT found (the test FAILS on main at 2d53ad3; it passes at 074a83c, before
the shared reads):

- test_a_client_that_subscribes_then_publishes_gets_its_message: a WebSocket
  sends `{"type":"subscribe","channel":C}` then `{"type":"publish","channel":C,..}`
  in one write, C already live on the node (another subscriber). The session
  joins C live at once, but its newest-id read (pushd.reads.SharedReads) is
  only sent at the turn's end, after the publish's command went out on the
  same pool; the read sees the message, `subscribed` says `position` = the
  message's id, and the live copy is dropped by the session's cut (id <=
  position): the client never receives a message it published after
  subscribing, and resuming from `position` skips it too. Observed:
  frames = [{"type":"subscribed","channel":"chat.own","recovered":false,
  "position":"<id of 'mine'>"}], no message. Fault: SharedReads deferring the
  since-less read past commands issued later in the same turn, combined with
  pushd.session._join/_position taking the read's newest id as the cut.

Everything else here passes: it covers what the unit tests of
tests/test_session.py do not (real sockets, real Redis, mixed transports, a
frozen Redis, twistd --workers).
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
import treq
import txredisapi
from twisted.internet import defer, reactor

from tests.sse import open_sse
from tests.support import (
    PushdUnderTest,
    RedisServer,
    WSClient,
    connect_raw,
    connect_ws,
    wait_for,
    with_timeout,
)


async def metric(pushd: PushdUnderTest, name: str) -> float:
    response = await treq.get(f"{pushd.url}/metrics", persistent=False)
    text = await response.text()
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def started(redis: RedisServer, prefix: str, **options: Any) -> PushdUnderTest:
    pushd = PushdUnderTest.config(redis=redis.address(), redis_prefix=prefix, **options)
    await pushd.start()
    return pushd


@pytest_twisted.async_yield_fixture
async def node(redis_server: RedisServer, prefix: str) -> AsyncIterator[PushdUnderTest]:
    pushd = await started(redis_server, prefix)
    yield pushd
    await pushd.stop()


async def clients(pushd: PushdUnderTest, n: int) -> list[WSClient]:
    connecting = [defer.ensureDeferred(pushd.connect()) for _ in range(n)]
    return list(await defer.gatherResults(connecting))


def subscribe_all(many: list[WSClient], channel: str, since: str | None) -> None:
    """One frame from each, sent in the same turn: pushd reads them in one pass."""
    frame: dict[str, Any] = {"type": "subscribe", "channel": channel}
    if since is not None:
        frame["since"] = since
    for client in many:
        client.send(frame)


async def messages_until(client: WSClient, last_id: str, channel: str) -> list[str]:
    ids = []
    while True:
        frame = await client.next()
        if frame["type"] != "message" or frame["channel"] != channel:
            continue
        ids.append(frame["id"])
        if frame["id"] == last_id:
            return ids


# -- 1. shared reads, WebSocket


@pytest_twisted.ensureDeferred
async def test_websockets_resuming_together_while_publishing_lose_nothing(
    node: PushdUnderTest,
) -> None:
    """20 WebSockets subscribe in one turn with the same since while a producer
    keeps publishing: each gets every message after since exactly once, in
    order, `recovered` true, and `position` is the last replayed id (or since)."""
    holder = await node.connect("?channel=news")  # the channel live on the node
    await holder.next_of("subscribed")
    ids = [await node.publish("news", n) for n in range(5)]
    many = await clients(node, 20)
    sent_before = await metric(node, "pushd_subscription_reads_total")
    shared_before = await metric(node, "pushd_subscription_reads_shared_total")

    publishing = defer.ensureDeferred(_publish_many(node, "news", list(range(5, 35))))
    subscribe_all(many, "news", ids[1])
    more_ids = await with_timeout(publishing)
    every = ids + more_ids
    assert await metric(node, "pushd_subscription_reads_shared_total") - shared_before >= 10
    assert await metric(node, "pushd_subscription_reads_total") - sent_before <= 10
    for client in many:
        ack = await client.next_of("subscribed")
        assert ack["recovered"] is True, ack
        got = await messages_until(client, every[-1], "news")
        assert got == every[2:], (ack, got)
        assert ack["position"] in every[1:]
        await client.nothing_more()
    for client in [*many, holder]:
        await client.close()


async def _publish_many(pushd: PushdUnderTest, channel: str, data: list[int]) -> list[str]:
    return [await pushd.publish(channel, n) for n in data]


@pytest_twisted.ensureDeferred
async def test_a_sharer_closing_during_the_read_leaves_the_others_whole(
    node: PushdUnderTest,
) -> None:
    """Of 6 WebSockets resuming together, 3 drop their TCP connection in the
    same turn: the 3 left get the replay, `subscribed`, then live messages."""
    holder = await node.connect("?channel=drop")
    await holder.next_of("subscribed")
    ids = [await node.publish("drop", n) for n in range(4)]
    many = await clients(node, 6)
    subscribe_all(many, "drop", ids[0])
    for client in many[:3]:
        client.transport.abortConnection()
    for client in many[3:]:
        ack = await client.next_of("subscribed")
        assert ack == {"type": "subscribed", "channel": "drop", "recovered": True,
                       "position": ids[-1]}  # fmt: skip
        assert [(await client.next_of("message"))["id"] for _ in range(3)] == ids[1:]
    live = await node.publish("drop", 99)
    for client in many[3:]:
        assert (await client.next_of("message"))["id"] == live
        await client.close()
    await holder.close()


@pytest_twisted.ensureDeferred
async def test_sharers_of_trimmed_history_all_say_not_recovered(
    redis_server: RedisServer, prefix: str
) -> None:
    pushd = await started(redis_server, prefix, history_size=5)
    try:
        holder = await pushd.connect("?channel=trim")
        await holder.next_of("subscribed")
        ids = [await pushd.publish("trim", n) for n in range(300)]
        many = await clients(pushd, 5)
        subscribe_all(many, "trim", ids[0])
        for client in many:
            ack = await client.next_of("subscribed")
            assert ack["recovered"] is False, ack
            assert ack["position"] == ids[-1]
            got = await messages_until(client, ids[-1], "trim")
            assert got == ids[-len(got) :]
        # since ahead of the channel: not recovered, live from now on
        ms = int(ids[-1].split("-")[0]) + 10**6
        subscribe_all(many, "ahead", None)  # another channel, for contrast
        more = await clients(pushd, 4)
        subscribe_all(more, "trim", f"{ms}-0")
        for client in more:
            ack = await client.next_of("subscribed")
            assert ack["recovered"] is False and ack["position"] == ids[-1], ack
        live = await pushd.publish("trim", "live")
        for client in more:
            assert (await client.next_of("message"))["id"] == live
        for client in [*many, *more, holder]:
            await client.close()
    finally:
        await pushd.stop()


@pytest_twisted.ensureDeferred
async def test_a_history_key_of_another_type_fails_the_read_once_and_all_go_live(
    node: PushdUnderTest, redis_server: RedisServer, prefix: str
) -> None:
    """The history key of a channel is a string (WRONGTYPE): sharers are told
    `recovered` false and get live messages; publishing fails as it may."""
    redis = await txredisapi.Connection("127.0.0.1", redis_server.port)
    try:
        await redis.set(f"{prefix}{{wrong}}:history", "x")
        holder = await node.connect("?channel=wrong")
        assert (await holder.next_of("subscribed"))["recovered"] is False
        many = await clients(node, 4)
        failed = await metric(node, "pushd_subscription_reads_failed_total")
        subscribe_all(many, "wrong", "1-0")
        for client in many:
            ack = await client.next_of("subscribed")
            assert ack["recovered"] is False and ack["position"] is None, ack
        assert await metric(node, "pushd_subscription_reads_failed_total") - failed == 1
        await redis.publish(f"{prefix}wrong", "foreign")
        for client in [*many, holder]:
            frame = await client.next_of("message")
            assert frame["data"] == "foreign"
            await client.close()
    finally:
        await redis.delete(f"{prefix}{{wrong}}:history")
        await redis.disconnect()


# -- 1 + 4. mixed transports sharing one read; SSE cursors; NDJSON lines


async def ndjson(pushd: PushdUnderTest, query: str) -> Any:
    raw = await connect_raw(pushd.port)
    raw.transport.write(f"GET /stream?{query} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    return raw


@pytest_twisted.ensureDeferred
async def test_sse_ndjson_and_websocket_resuming_together(node: PushdUnderTest) -> None:
    """SSE streams of two channels, NDJSON streams and WebSockets resume with
    the same since at once: each gets every message once, SSE ids as cursors
    that resume both channels, NDJSON one envelope per line."""
    holder = await node.connect("?channel=ma")
    holder.send({"type": "subscribe", "channel": "mb"})
    await holder.next_of("subscribed")
    await holder.next_of("subscribed")
    a_ids = [await node.publish("ma", {"a": n}) for n in range(6)]
    b_ids = [await node.publish("mb", {"b": n}) for n in range(3)]
    since = a_ids[0]
    sse = [open_sse(f"{node.url}/sse?channel=ma&channel=mb&since={since}") for _ in range(3)]
    nd = [ndjson(node, f"channel=ma&since={since}") for _ in range(3)]
    ws = [connect_ws(node.port, f"/ws?channel=ma&since={since}") for _ in range(3)]
    streams = await defer.gatherResults([defer.ensureDeferred(d) for d in sse])
    raws = await defer.gatherResults([defer.ensureDeferred(d) for d in nd])
    sockets = await defer.gatherResults([defer.ensureDeferred(d) for d in ws])

    for client in sockets:
        ack = await client.next_of("subscribed")
        assert ack["recovered"] is True and ack["position"] == a_ids[-1], ack
        assert [(await client.next_of("message"))["id"] for _ in range(5)] == a_ids[1:]
    expected_b = [m for m in b_ids if m > since]
    for stream in streams:
        events = []
        while True:
            event = await stream.next()
            events.append(event)
            if event.type == "subscribed" and "channels" in json.loads(event.data):
                break
        got = [json.loads(e.data) for e in events if e.type == "message"]
        assert [m["id"] for m in got if m["channel"] == "ma"] == a_ids[1:]
        assert [m["id"] for m in got if m["channel"] == "mb"] == expected_b
        assert json.loads(events[-1].data)["channels"] == {"ma": a_ids[-1], "mb": b_ids[-1]}
        # The final cursor resumes both channels: nothing more, nothing lost.
        again = await open_sse(
            f"{node.url}/sse?channel=ma&channel=mb",
            headers={"Last-Event-ID": events[-1].last_event_id},
        )
        ack = [json.loads((await again.next()).data) for _ in range(3)]
        assert [a.get("recovered") for a in ack[:2]] == [True, True], ack
        assert ack[2]["channels"] == {"ma": a_ids[-1], "mb": b_ids[-1]}
        again.close()
        stream.close()
    for raw in raws:
        data = await raw.until(a_ids[-1].encode())
        body = data.split(b"\r\n\r\n", 1)[1]
        lines = [json.loads(line) for line in body.split(b"\n") if line]
        assert lines[0]["type"] == "subscribed" and lines[0]["recovered"] is True
        assert [m["id"] for m in lines[1:]] == a_ids[1:]
        raw.transport.loseConnection()
    for client in [*sockets, holder]:
        await client.close()


# -- 2. a frozen Redis with --redis-timeout


@pytest_twisted.ensureDeferred
async def test_redis_asleep_times_out_promptly_then_recovers(
    own_redis: RedisServer, prefix: str
) -> None:
    """Redis frozen 3 s (SIGSTOP, as `DEBUG SLEEP 3`, which Redis 7 refuses
    by default) with --redis-timeout 0.5: a publish answers 503/504 within
    about the timeout, resuming subscribers are told recovered false within
    about the timeout (not after the sleep), and after the sleep publishing
    and recovery work again."""
    pushd = await started(own_redis, prefix, redis_timeout=0.5)
    try:
        holder = await pushd.connect("?channel=sleepy")
        await holder.next_of("subscribed")
        first = await pushd.publish("sleepy", 0)
        many = await clients(pushd, 3)
        assert own_redis.process is not None
        own_redis.process.send_signal(signal.SIGSTOP)
        reactor.callLater(3, own_redis.process.send_signal, signal.SIGCONT)
        begun = time.monotonic()
        subscribe_all(many, "sleepy", first)
        response = await treq.post(
            f"{pushd.url}/channels/sleepy", b"1",
            headers={"content-type": ["application/json"]}, persistent=False,
        )  # fmt: skip
        answered = time.monotonic() - begun
        body = await response.json()
        assert response.code in (503, 504), body
        assert answered < 2.0, answered
        for client in many:
            ack = await client.next_of("subscribed", timeout=10)
            assert ack["recovered"] is False, ack
        assert time.monotonic() - begun < 2.5

        async def publishes() -> bool:
            r = await treq.post(
                f"{pushd.url}/channels/sleepy", b"2",
                headers={"content-type": ["application/json"]}, persistent=False,
            )  # fmt: skip
            await r.content()
            return r.code == 200

        await wait_for(publishes, timeout=20, what="publishing to work again")
        again = await pushd.connect(f"?channel=sleepy&since={first}")
        ack = await again.next_of("subscribed")
        assert ack["recovered"] is True, ack
        for client in [*many, again, holder]:
            await client.close()
    finally:
        if own_redis.process is not None:
            own_redis.process.send_signal(signal.SIGCONT)
        await pushd.stop()


# -- 5. Autobahn's options, effective on real connections


@pytest_twisted.ensureDeferred
async def test_a_second_factory_keeps_its_own_options(
    redis_server: RedisServer, prefix: str
) -> None:
    """Two pushd services in one process (as pushd.testing users run them) with
    different --max-message-size and --ping-interval: each keeps its own."""
    small = await started(redis_server, prefix, max_message_size=1000)
    big = await started(redis_server, prefix, max_message_size=200_000)
    try:
        client = await big.connect()
        client.send({"type": "publish", "channel": "x", "data": "y" * 100_000})
        frame = await client.next()
        # Read whole (no 1009): answered with an error frame (no publish grant).
        assert frame["type"] == "error" and frame["code"] == "forbidden", frame
        assert not client.closed.called
        await client.close()
        client = await small.connect()
        client.send({"type": "publish", "channel": "x", "data": "y" * 100_000})
        closed = await with_timeout(client.closed)
        assert closed[1] == 1009, closed
    finally:
        await small.stop()
        await big.stop()


# -- 1. the read now waits for the turn's end: what was published in that turn


@pytest_twisted.ensureDeferred
async def test_a_client_that_subscribes_then_publishes_gets_its_message(
    redis_server: RedisServer, prefix: str
) -> None:
    """A WebSocket sends `subscribe` then `publish` on the same channel (two
    frames in one write; the channel already live on the node): it gets its
    own message. Found broken: the newest-id read, sent at the turn's end (the
    shared reads), saw the message, `position` was its id and the live copy
    was dropped as already seen. A client's publish now waits for its own
    subscription of that channel to be acknowledged (Session.acknowledged)."""
    from tests.support import SECRET, token

    pushd = await started(redis_server, prefix, token_secret=SECRET)
    try:
        grant = token(None, channels=["chat.*"], publish=["chat.*"])
        holder = await pushd.connect(f"?channel=chat.own&token={grant}")
        await holder.next_of("subscribed")
        writer = await pushd.connect(f"?token={grant}")
        writer.sendMessage(json.dumps({"type": "subscribe", "channel": "chat.own"}).encode())
        writer.sendMessage(
            json.dumps({"type": "publish", "channel": "chat.own", "data": "mine"}).encode()
        )
        sent = await holder.next_of("message")
        ack = await writer.next_of("subscribed")
        frames = [ack]
        writer.send({"type": "ping"})
        while (frame := await writer.next())["type"] != "pong":
            frames.append(frame)
        assert [f for f in frames if f["type"] == "message"] == [sent], (
            f"subscribed with position {ack['position']} (the message's id: {sent['id']}), "
            f"frames {frames}"
        )
        await writer.close()
        await holder.close()
    finally:
        await pushd.stop()


@pytest_twisted.ensureDeferred
async def test_resuming_together_on_every_broker_after_a_script_flush(
    start_pushd: Any, broker_servers: tuple[RedisServer, ...]
) -> None:
    """On memory, one Redis and 3 shards, after SCRIPT FLUSH on every Redis:
    8 WebSockets resume 4 channels together (2 a channel, some with since,
    some without): each gets what it should, once."""
    pushd = await start_pushd()
    for server in broker_servers:
        redis = await txredisapi.Connection("127.0.0.1", server.port)
        await redis.execute_command("SCRIPT", "FLUSH")
        await redis.disconnect()
    names = ["s.a", "s.b", "s.c", "s.d"]
    holder = await pushd.connect("?" + "&".join(f"channel={c}" for c in names))
    for _ in names:
        await holder.next_of("subscribed")
    ids = {c: [await pushd.publish(c, n) for n in range(3)] for c in names}
    many = await clients(pushd, 8)
    for n, client in enumerate(many):
        channel = names[n % 4]
        frame: dict[str, Any] = {"type": "subscribe", "channel": channel}
        if n < 4:
            frame["since"] = ids[channel][0]
        client.send(frame)
    for n, client in enumerate(many):
        channel = names[n % 4]
        ack = await client.next_of("subscribed")
        assert ack["position"] == ids[channel][-1], ack
        if n < 4:
            assert ack["recovered"] is True
            assert [(await client.next_of("message"))["id"] for _ in range(2)] == ids[channel][1:]
    live = {c: await pushd.publish(c, "live") for c in names}
    for n, client in enumerate(many):
        assert (await client.next_of("message"))["id"] == live[names[n % 4]]
        await client.nothing_more()
        await client.close()
    await holder.close()


@pytest_twisted.ensureDeferred
async def test_leave_and_come_back_in_one_write_resumes_once(node: PushdUnderTest) -> None:
    """One write: subscribe since A, unsubscribe, subscribe since B (alone on
    the channel, and with another subscriber on it): one `subscribed`, the
    replay after B, live messages once."""
    for alone in (True, False):
        channel = f"back.{int(alone)}"
        holder = None
        if not alone:
            holder = await node.connect(f"?channel={channel}")
            await holder.next_of("subscribed")
        ids = [await node.publish(channel, n) for n in range(5)]
        client = await node.connect()
        for frame in (
            {"type": "subscribe", "channel": channel, "since": ids[0]},
            {"type": "unsubscribe", "channel": channel},
            {"type": "subscribe", "channel": channel, "since": ids[2]},
        ):
            client.sendMessage(json.dumps(frame).encode())
        frames = []
        while True:
            frame = await client.next()
            frames.append(frame)
            if frame.get("id") == ids[-1]:
                break
        kinds = [(f["type"], f.get("id")) for f in frames if f["type"] != "unsubscribed"]
        assert kinds == [("subscribed", None), ("message", ids[3]), ("message", ids[4])], frames
        live = await node.publish(channel, "live")
        assert (await client.next_of("message"))["id"] == live
        await client.nothing_more()
        await client.close()
        if holder is not None:
            await holder.close()


@pytest_twisted.ensureDeferred
async def test_a_big_replay_to_a_paused_sse_reader_is_whole(
    redis_server: RedisServer, prefix: str
) -> None:
    """2,000 messages of 2 KB replayed (one write) to an SSE reader that does
    not read for a while, with --max-send-buffer 64 KiB: the replay is not the
    client's slowness; once it reads it gets every event, framed, with its id."""
    pushd = await started(redis_server, prefix, max_send_buffer=65536, history_size=5000)
    try:
        blob = "x" * 2000
        ids = [await pushd.publish("big", {"n": n, "blob": blob}) for n in range(2000)]
        raw = await connect_raw(pushd.port)
        raw.transport.pauseProducing()
        raw.transport.write(
            f"GET /sse?channel=big&since={ids[0]} HTTP/1.0\r\nHost: x\r\n\r\n".encode()
        )
        d: Any = defer.Deferred()
        reactor.callLater(1.0, d.callback, None)
        await d
        raw.transport.resumeProducing()
        data = await raw.until(b"\nid: " + ids[-1].encode() + b"\n", timeout=20)
        body = data.split(b"\r\n\r\n", 1)[1].decode()
        events = [e for e in body.split("\n\n") if e.startswith("id: ")]
        assert [e.split("\n")[0][4:] for e in events] == ids[1:]
        assert all(json.loads(e.split("\n")[1][6:])["data"]["blob"] == blob for e in events)
        raw.transport.loseConnection()
    finally:
        await pushd.stop()


@pytest_twisted.ensureDeferred
async def test_presence_channel_sharers_hear_subscribed_first_then_replay_and_joins(
    redis_server: RedisServer, prefix: str
) -> None:
    """On a --presence / --join-leave channel, 4 WebSockets resume together:
    each hears `subscribed` before anything of the channel, the replay once,
    and every other's join; the presence query counts them all."""
    pushd = await started(redis_server, prefix, presence=("room.*",), join_leave=("room.*",))
    try:
        ids = [await pushd.publish("room.1", n) for n in range(3)]
        holder = await pushd.connect("?channel=room.1")
        await holder.next_of("subscribed")
        many = await clients(pushd, 4)
        subscribe_all(many, "room.1", ids[0])
        for client in many:
            frames = [await client.next()]
            assert frames[0]["type"] == "subscribed" and frames[0]["recovered"] is True, frames
            messages = []
            joins = 0
            while len(messages) < 2 or joins < 3:
                frame = await client.next()
                frames.append(frame)
                if frame["type"] == "message":
                    messages.append(frame["id"])
                elif frame["type"] == "join":
                    joins += 1
            assert messages == ids[1:], frames
        for client in many:
            client.send({"type": "presence", "channel": "room.1"})
            while (frame := await client.next())["type"] != "presence":
                assert frame["type"] == "join", frame
            assert frame["count"] == 5, frame
        for client in [*many, holder]:
            await client.close()
    finally:
        await pushd.stop()


# -- 3 + 5. twistd with --workers 2: the collector set, Autobahn's options effective


@pytest_twisted.ensureDeferred
async def test_twistd_workers_keep_autobahns_options_and_recover(
    redis_server: RedisServer, tmp_path: Any, prefix: str
) -> None:
    """`twistd -n pushd --workers 2 --ping-interval 1 --ping-timeout 1
    --max-message-size 1000`: a peer that never answers pings is dropped, a
    frame past the size is closed 1009, and clients resuming together on the
    workers recover what they missed."""
    import struct

    from tests.support import Node
    from tests.test_websocket_wire import open_raw, server_frames

    node = Node(
        tmp_path, "--workers", "2", "--ping-interval", "1", "--ping-timeout", "1",
        "--max-message-size", "1000",
        "--redis", f"redis://127.0.0.1:{redis_server.port}", "--redis-prefix", prefix,
    )  # fmt: skip
    node.start()
    try:
        await node.workers_ready()
        silent = [await open_raw(node) for _ in range(4)]  # type: ignore[arg-type]
        polite = [await node.connect() for _ in range(4)]
        for raw in silent:
            await with_timeout(raw.lost, 6)
            assert any(opcode == 0x9 for opcode, _ in server_frames(raw.data))
        for client in polite:
            assert not client.closed.called
        # A frame of 5,000 bytes (a masked text frame) is past the limit: 1009.
        for _ in range(4):
            raw = await open_raw(node)  # type: ignore[arg-type]
            payload = b"x" * 5000
            raw.transport.write(
                b"\x81\xfe" + struct.pack("!H", len(payload)) + b"\0\0\0\0" + payload
            )
            await with_timeout(raw.lost, 5)
            closes = [p for op, p in server_frames(raw.data) if op == 0x8]
            assert closes and struct.unpack("!H", closes[0][:2])[0] == 1009, raw.data[-50:]
        ids = [await node.publish("w.news", n) for n in range(4)]
        many = [await node.connect(f"?channel=w.news&since={ids[0]}") for _ in range(6)]
        for client in many:
            ack = await client.next_of("subscribed")
            assert ack["recovered"] is True and ack["position"] == ids[-1]
            assert [(await client.next_of("message"))["id"] for _ in range(3)] == ids[1:]
        for client in [*many, *polite]:
            await client.close()
        assert "Traceback" not in node.output(), node.output()[-3000:]
    finally:
        node.stop()

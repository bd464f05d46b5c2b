"""The WebSocket endpoint end to end: a real Autobahn client against pushd on a
real port, on the memory broker and on Redis."""

from __future__ import annotations

import pytest
import pytest_twisted

from pushd.transports import websocket
from tests.support import PushdUnderTest, StartPushd, channel_subscriptions, wait_for


@pytest_twisted.ensureDeferred
async def test_url_subscription_is_acknowledged_then_delivers(pushd: PushdUnderTest) -> None:
    client = await pushd.connect("?channel=news&channel=sport")
    acks = {(await client.next_of("subscribed"))["channel"] for _ in range(2)}
    assert acks == {"news", "sport"}

    msg_id = await pushd.publish("news", {"headline": "hi"})
    assert await client.next() == {
        "type": "message",
        "channel": "news",
        "id": msg_id,
        "data": {"headline": "hi"},
    }
    await pushd.publish("sport", "goal")
    frame = await client.next_of("message")
    assert (frame["channel"], frame["data"]) == ("sport", "goal")
    await client.close()


@pytest_twisted.ensureDeferred
async def test_subscribe_and_unsubscribe_frames(pushd: PushdUnderTest) -> None:
    client = await pushd.connect()
    client.send({"type": "subscribe", "channel": "room.1"})
    assert await client.next() == {
        "type": "subscribed", "channel": "room.1", "recovered": False, "position": None
    }  # fmt: skip
    await pushd.publish("room.1", 1)
    assert (await client.next_of("message"))["data"] == 1

    client.send({"type": "unsubscribe", "channel": "room.1"})
    assert await client.next() == {"type": "unsubscribed", "channel": "room.1"}
    await pushd.publish("room.1", 2)
    await client.nothing_more()
    assert pushd.hub.channels() == {}
    await client.close()


@pytest_twisted.ensureDeferred
async def test_every_subscriber_gets_each_message_once_in_order(pushd: PushdUnderTest) -> None:
    clients = [await pushd.connect("?channel=fan") for _ in range(5)]
    for client in clients:
        await client.next_of("subscribed")
    ids = [await pushd.publish("fan", n) for n in range(20)]
    for client in clients:
        got = [await client.next_of("message") for _ in range(20)]
        assert [f["id"] for f in got] == ids
        assert [f["data"] for f in got] == list(range(20))
        await client.nothing_more()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_message_is_framed_once_for_all_subscribers(
    pushd: PushdUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    framed = []
    original = websocket.text_frame

    def counting(payload: bytes) -> bytes:
        framed.append(payload)
        return original(payload)

    monkeypatch.setattr(websocket, "text_frame", counting)
    clients = [await pushd.connect("?channel=once") for _ in range(4)]
    for client in clients:
        await client.next_of("subscribed")
    await pushd.publish("once", "x")
    for client in clients:
        assert (await client.next_of("message"))["data"] == "x"
        await client.close()
    assert len([p for p in framed if b'"type":"message"' in p]) == 1


@pytest_twisted.ensureDeferred
async def test_ping_frame_answers_pong(pushd: PushdUnderTest) -> None:
    client = await pushd.connect()
    client.send({"type": "ping"})
    assert await client.next() == {"type": "pong"}
    await client.close()


@pytest_twisted.ensureDeferred
async def test_bad_frames_get_error_frames_and_the_connection_stays(
    pushd: PushdUnderTest,
) -> None:
    client = await pushd.connect("?channel=calm")
    await client.next_of("subscribed")
    cases = [
        (b"not json", "bad_json"),
        (b"[1, 2]", "bad_request"),
        (b'{"no": "type"}', "bad_request"),
        (b'{"type": "dance"}', "unknown_type"),
        (b'{"type": "subscribe", "channel": "has space"}', "bad_channel"),
        (b'{"type": "subscribe", "channel": 7}', "bad_channel"),
        (b'{"type": "subscribe", "channel": "ok", "since": "yesterday"}', "bad_since"),
        (b'{"type": "subscribe", "channel": "calm"}', "already_subscribed"),
        (b'{"type": "publish", "channel": "calm", "data": 1}', "forbidden"),
    ]
    for frame, code in cases:
        client.sendMessage(frame)
        error = await client.next_of("error")
        assert error["code"] == code, (frame, error)
        assert error["message"]
    client.sendMessage(b"\x00\x01", isBinary=True)
    assert (await client.next_of("error"))["code"] == "bad_request"
    # Still subscribed and still served.
    await pushd.publish("calm", "still here")
    assert (await client.next_of("message"))["data"] == "still here"
    await client.close()


@pytest_twisted.ensureDeferred
async def test_invalid_channel_in_url_is_an_error_frame(pushd: PushdUnderTest) -> None:
    client = await pushd.connect("?channel=a%20b&channel=fine")
    frames = [await client.next(), await client.next()]
    assert {"type": "subscribed", "channel": "fine", "recovered": False, "position": None} in frames
    error = next(f for f in frames if f["type"] == "error")
    assert (error["code"], error["channel"]) == ("bad_channel", "a b")
    await client.close()


@pytest_twisted.ensureDeferred
async def test_oversize_frame_closes_with_1009(start_pushd: StartPushd) -> None:
    small = await start_pushd(max_message_size=1024)
    client = await small.connect()
    client.sendMessage(b'{"type":"ping","pad":"' + b"x" * 3000 + b'"}')
    _, code, _ = await client.closed
    assert code == 1009


@pytest_twisted.ensureDeferred
async def test_closing_leaves_nothing_behind(pushd: PushdUnderTest, redis_client) -> None:  # type: ignore[no-untyped-def]
    """1,000 connect/subscribe/disconnect cycles: no hub entry, no Redis subscription."""
    for round_ in range(100):
        clients = [await pushd.connect(f"?channel=c{round_ % 7}&channel=shared") for _ in range(10)]
        for client in clients:
            await client.next_of("subscribed")
        for client in clients:
            client.transport.abortConnection() if round_ % 2 else await client.close()
    await wait_for(lambda: pushd.hub.channels() == {}, what="hub to empty")
    assert pushd.service.broker.subscribed_channels() == frozenset()

    async def no_redis_subscriptions() -> bool:
        return await channel_subscriptions(redis_client, pushd.cfg.redis_prefix) == []

    if pushd.cfg.redis:
        await wait_for(no_redis_subscriptions, what="Redis subscriptions to go")


@pytest_twisted.ensureDeferred
async def test_connections_leave_nothing_to_the_cycle_collector(pushd: PushdUnderTest) -> None:
    """Opening and closing connections frees pushd's side of them at once, by
    reference counting: no full collections (pauses) as thousands come and go."""
    import gc

    def pushd_garbage() -> list[str]:
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            ours = {"PushdServerProtocol", "PushdChannel", "PushdRequest", "Session", "Server"}
            return [type(o).__name__ for o in gc.garbage if type(o).__name__ in ours]
        finally:
            gc.garbage.clear()
            gc.set_debug(0)

    gc.collect()
    gc.disable()
    try:
        clients = [await pushd.connect("?channel=gc") for _ in range(10)]
        for client in clients:
            await client.next_of("subscribed")
        assert pushd_garbage() == []  # open: the upgrade's HTTP channel and request went
        for client in clients:
            await client.close()
        await wait_for(lambda: not pushd.hub.count("gc"), what="the hub to let go")
        await wait_for(
            lambda: not pushd.service.listeners[0].factory.ws_factory.clients,
            what="the connections to close",
        )
        assert pushd_garbage() == []  # closed
    finally:
        gc.enable()


@pytest_twisted.ensureDeferred
async def test_an_open_connection_holds_no_futures_nor_traffic_counters_of_its_own(
    pushd: PushdUnderTest,
) -> None:
    """The Autobahn diet (pushd.transports.autobahn_diet): an open connection
    shares one future and its factory's traffic counters, and still opens,
    delivers and closes as before."""
    from pushd.transports.autobahn_diet import UNHEARD

    clients = [await pushd.connect("?channel=diet") for _ in range(2)]
    for client in clients:
        await client.next_of("subscribed")
    assert pushd.service is not None
    a, b = tuple(pushd.service.site.ws_factory.clients)
    assert a.is_open is UNHEARD and a.is_closed is UNHEARD
    assert a.trafficStats is b.trafficStats
    await pushd.publish("diet", 1)
    for client in clients:
        assert (await client.next_of("message"))["data"] == 1
        await client.close()
    await wait_for(lambda: not pushd.service.site.ws_factory.clients)  # type: ignore[union-attr]

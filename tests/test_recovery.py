"""Recovery with `since`: every retained message after it, once, in order, and
"recovered" true only when nothing after it can be missing."""

from __future__ import annotations

import random

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web.client import HTTPConnectionPool

from pushd.message import parse_id
from tests.support import PushdUnderTest, RedisServer, StartPushd, WSClient, wait_for


async def subscribe_since(pushd: PushdUnderTest, channel: str, since: str) -> tuple[WSClient, bool]:
    client = await pushd.connect()
    client.send({"type": "subscribe", "channel": channel, "since": since})
    ack = await client.next_of("subscribed")
    return client, ack["recovered"]


@pytest_twisted.ensureDeferred
async def test_since_replays_what_was_missed_then_goes_live(pushd: PushdUnderTest) -> None:
    ids = [await pushd.publish("news", n) for n in range(6)]
    client, recovered = await subscribe_since(pushd, "news", ids[2])
    assert recovered is True
    replay = [await client.next_of("message") for _ in range(3)]
    assert [(f["id"], f["data"]) for f in replay] == [(ids[n], n) for n in (3, 4, 5)]
    live = await pushd.publish("news", 6)
    assert (await client.next_of("message"))["id"] == live
    await client.nothing_more()
    await client.close()


@pytest_twisted.ensureDeferred
async def test_since_the_newest_id_recovers_nothing_and_is_complete(pushd: PushdUnderTest) -> None:
    ids = [await pushd.publish("news", n) for n in range(3)]
    client = await pushd.connect(f"?channel=news&since={ids[-1]}")
    assert (await client.next_of("subscribed"))["recovered"] is True
    await client.nothing_more()
    await client.close()


@pytest_twisted.ensureDeferred
async def test_an_id_that_never_was_is_not_recovered(pushd: PushdUnderTest) -> None:
    ids = [await pushd.publish("news", n) for n in range(3)]
    ms, seq = parse_id(ids[0])
    client, recovered = await subscribe_since(pushd, "news", f"{ms}-{seq + 1000}")
    assert recovered is False
    await client.close()
    client, recovered = await subscribe_since(pushd, "quiet", ids[0])
    assert recovered is False
    await client.nothing_more()
    await client.close()


@pytest_twisted.ensureDeferred
async def test_trimmed_history_is_not_recovered(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(history_size=5)
    ids = [await pushd.publish("news", n) for n in range(400)]
    client, recovered = await subscribe_since(pushd, "news", ids[0])
    assert recovered is False
    replay = []
    while True:
        frame = await client.next_of("message")
        replay.append(frame["id"])
        if frame["id"] == ids[-1]:
            break
    # What is retained still comes, in order, ending with the newest.
    assert replay == ids[-len(replay) :] and 5 <= len(replay) < 399
    await client.close()
    # A since still inside what is retained recovers.
    client, recovered = await subscribe_since(pushd, "news", ids[-3])
    assert recovered is True
    assert [(await client.next_of("message"))["id"] for _ in range(2)] == ids[-2:]
    await client.close()


@pytest_twisted.ensureDeferred
async def test_expired_history_is_not_recovered(start_pushd: StartPushd) -> None:
    pushd = await start_pushd(history_ttl=1)
    ids = [await pushd.publish("news", n) for n in range(3)]
    broker = pushd.service.broker

    async def expired() -> bool:
        return await broker.last_id("news") is None

    await wait_for(expired, timeout=5, what="the history to expire")
    client, recovered = await subscribe_since(pushd, "news", ids[0])
    assert recovered is False
    await client.nothing_more()
    # A new history starts, linked to the newest id the channel had (remembered
    # past its history): from that id nothing is missing; from an older one it is.
    await pushd.publish("news", "fresh")
    await client.next_of("message")
    client2, recovered = await subscribe_since(pushd, "news", ids[-1])
    assert recovered is True
    client3, recovered = await subscribe_since(pushd, "news", ids[0])
    assert recovered is False
    assert (await client3.next_of("message"))["data"] == "fresh"
    await client3.close()
    assert (await client2.next_of("message"))["data"] == "fresh"
    await client.close()
    await client2.close()


@pytest_twisted.ensureDeferred
async def test_redis_restarted_empty_is_not_recovered(own_redis: RedisServer, prefix: str) -> None:
    pushd = PushdUnderTest.config(redis=own_redis.address(), redis_prefix=prefix)
    await pushd.start()
    try:
        ids = [await pushd.publish("news", n) for n in range(3)]
        own_redis.kill()
        own_redis.start()

        async def accepted() -> bool:
            return (await pushd.post("other", "x")).code == 200

        await wait_for(accepted, timeout=20, what="Redis to be back")
        client, recovered = await subscribe_since(pushd, "news", ids[0])
        assert recovered is False
        await client.nothing_more()
        await client.close()
    finally:
        await pushd.stop()


@pytest_twisted.ensureDeferred
async def test_clients_joining_during_a_publish_storm_get_contiguous_sequences(
    start_pushd: StartPushd,
) -> None:
    """3,000 messages as fast as 4 producers can post them; 40 clients join at
    random moments with an id they saw earlier; each gets exactly every message
    after its id, in order."""
    total, joiners = 3000, 40
    pushd = await start_pushd(history_size=total)
    rng = random.Random(7)
    ids: list[str] = []
    clients: list[tuple[str, WSClient]] = []
    join_at = sorted(rng.sample(range(50, total - 50), joiners))

    async def join() -> None:
        since = rng.choice(ids[-200:])
        client = await pushd.connect(f"?channel=storm&since={since}")
        clients.append((since, client))

    # Each producer keeps its connection alive, as producers at full speed do.
    pool = HTTPConnectionPool(reactor, persistent=True)

    async def producer(share: list[int]) -> None:
        for n in share:
            ids.append(await pushd.publish("storm", n, pool=pool))
            if join_at and len(ids) >= join_at[0]:
                join_at.pop(0)
                await join()

    numbers = list(range(total))
    try:
        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(producer(numbers[k::4])) for k in range(4)]
        )
    finally:
        await pool.closeCachedConnections()
    final = sorted(ids, key=parse_id)
    assert len(clients) == joiners
    for since, client in clients:
        ack = await client.next_of("subscribed")
        assert ack["recovered"] is True, since
        expected = [i for i in final if parse_id(i) > parse_id(since)]
        got = [frame["id"] for frame in await client.next_many(len(expected), "message")]
        assert got == expected
        await client.nothing_more()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_client_far_behind_catches_up_past_the_send_buffer(
    start_pushd: StartPushd,
) -> None:
    """Replayed history is bounded by --history-size, not --max-send-buffer: a
    client 3,000 messages (600 KB) behind is not taken for a slow consumer."""
    pushd = await start_pushd(history_size=3000, max_send_buffer=65536)
    payload = b'{"pad":"' + b"x" * 200 + b'"}'
    ids = [(await pushd.service.broker.publish("far", payload)).id for _ in range(3000)]
    client = await pushd.connect(f"?channel=far&since={ids[0]}")
    assert (await client.next_of("subscribed"))["recovered"] is True
    got = [(await client.next_of("message"))["id"] for _ in ids[1:]]
    assert got == ids[1:]
    await client.nothing_more()
    await client.close()
